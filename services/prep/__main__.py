from services.prep.app import main

main()
