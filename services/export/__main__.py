from services.export.app import main

main()
