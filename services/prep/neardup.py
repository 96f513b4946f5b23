"""Deterministic near-duplicate detection: one-permutation MinHash over word 3-shingles, LSH banding.

Method (all numpy, no per-token Python objects, no ``hash()``, no randomness beyond ``seed``):

* Features. A text is lowercased (ASCII), every byte that is not ``[a-z0-9_]`` or part of a non-ASCII
  UTF-8 sequence becomes a separator, so punctuation and whitespace changes vanish. Only the first
  ``max_chars`` characters are used (2,048 by default, 72% of the JIRA bytes); when either text of a pair
  was cut, the pair must also have lengths within ``threshold`` of each other (Jaccard >= t implies
  that the sets' sizes are within a factor t), so two long reports that only share a 2 KB opening
  are not reported. Texts with fewer than 3 words use their words as shingles. A text with no word
  at all is never reported and never indexed.
* Token hash: the first 8 and the last 8 bytes of the word plus its length (a 17+ byte word is
  identified by those; its middle is ignored), mixed with a seeded 64-bit finaliser.
  Shingle hash: a seeded mix of three consecutive token hashes.
* Signature: one-permutation hashing (Li, Owen & Zhang 2012) into ``num_perm`` bins (top bits of the
  shingle hash pick the bin, the low 56 bits are the value, the minimum per bin is kept). One hash
  per shingle instead of ``num_perm``: this is what makes it affordable in numpy. Short texts leave
  bins empty; similarity is then estimated as equal filled bins / bins filled in either, and a band
  whose bins are all empty is not used as an LSH key (densification was measured: it cost more
  than the whole sketch on the JIRA rows).
* LSH: ``bands`` x ``rows`` (16 x 8 by default). P[a pair becomes a candidate] = 1-(1-J^8)^16:
  J=0.9: 0.9999, J=0.8: 0.947, J=0.7: 0.61, J=0.5: 0.06. Candidates are then verified: the share of
  equal bins estimates J with a standard deviation of about sqrt(J(1-J)/128) = 0.035 at J=0.8.
  Trade-off: a true J=0.8 pair is reported about half of the time, J>=0.87 almost always
  (recall), and J<=0.72 almost never (precision). Raise ``num_perm`` to narrow that band.

Order semantics: :meth:`NearDupIndex.add_many` behaves exactly like calling :meth:`add` per text in
order. A text found to be a near-duplicate is *not* inserted (the first of a cluster stays the
representative), so chains A~B~C with A!~C keep A and C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable, NamedTuple, Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.8
_U64 = np.uint64
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_VAL_MASK = np.uint64((1 << 56) - 1)
_BYTE_MASKS = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
_CHUNK_CHARS = 256_000  # texts are sketched in chunks of about this many characters: the arrays stay
# in cache and are reused by malloc (2M-character chunks cost 60% more, a third of it page faults)


def _word_table() -> bytes:
    t = bytearray(256)
    for c in range(256):
        ch = chr(c)
        if c >= 128:
            t[c] = c  # UTF-8 lead/continuation bytes: part of a word
        elif ch.isascii() and (ch.isalnum() or ch == "_"):
            t[c] = ord(ch.lower())
    return bytes(t)


_WORD = _word_table()


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """murmur3 fmix64, in place on a fresh array."""
    x ^= x >> _U64(33)
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


class Sketch(NamedTuple):
    """Per-text sketches (:meth:`NearDupIndex.sketch`), row-aligned with the texts."""

    sigs: np.ndarray  # (n, num_perm) uint64
    lens: np.ndarray  # (n,) characters
    has: np.ndarray  # (n,) bool: the text has a word
    band_keys: np.ndarray  # (n, bands) uint64, _EMPTY where the band is no LSH key

    def take(self, idx) -> Sketch:
        return Sketch(self.sigs[idx], self.lens[idx], self.has[idx], self.band_keys[idx])


@dataclass(frozen=True)
class Match:
    key: Hashable  # the key the earlier text was added under
    similarity: float  # estimated Jaccard of the word-3-shingle sets


class NearDupIndex:
    def __init__(self, threshold: float = DEFAULT_THRESHOLD, *, num_perm: int = 128, bands: int = 16,
                 max_chars: int = 2048, seed: int = 0) -> None:
        if num_perm & (num_perm - 1) or not 8 <= num_perm <= 1024:
            raise ValueError("num_perm must be a power of two between 8 and 1024")
        if num_perm % bands:
            raise ValueError("bands must divide num_perm")
        if not 0 < threshold <= 1:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.num_perm, self.bands, self.rows = num_perm, bands, num_perm // bands
        self.max_chars = max_chars
        self._log_k = num_perm.bit_length() - 1
        s = [_splitmix(seed * 16 + i) | 1 for i in range(8)]
        self._salt, self._c1, self._c2, self._p1, self._p2, self._dens = (_U64(v) for v in s[:6])
        self._band_mul = np.array([_splitmix(seed * 977 + 101 + i) | 1 for i in range(self.rows)], dtype=np.uint64)
        self._band_salt = np.array([_splitmix(seed * 131 + 7 + i) for i in range(bands)], dtype=np.uint64)
        # index state
        self._sigs = np.empty((0, num_perm), dtype=np.uint64)
        self._lens = np.empty(0, dtype=np.int64)
        self._keys: list[Hashable] = []
        self._fk = np.empty(0, dtype=np.uint64)  # folded band keys, sorted
        self._fo = np.empty(0, dtype=np.int64)  # owner id of each

    def __len__(self) -> int:
        return len(self._keys)

    # ---------- sketching ----------

    def sketch(self, texts: Sequence[str], *, sigs: np.ndarray | None = None,
               band_keys: np.ndarray | None = None, encoded: Sequence[bytes] | None = None) -> Sketch:
        """Everything :meth:`add_many` needs of each text, computed ahead (e.g. in another process:
        a text's sketch depends on the text and the index's parameters only). ``sigs`` and
        ``band_keys`` may be given as the (n, num_perm) and (n, bands) uint64 arrays to fill (shared
        memory, say). ``encoded``: the texts' UTF-8, when the caller has it."""
        n = len(texts)
        if sigs is None:
            sigs = np.empty((n, self.num_perm), dtype=np.uint64)
        if band_keys is None:
            band_keys = np.empty((n, self.bands), dtype=np.uint64)
        lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
        start, acc = 0, 0
        for i, t in enumerate(texts):
            acc += min(len(t), self.max_chars)
            if acc >= _CHUNK_CHARS or i == n - 1:
                chunk = self._sketch_chunk(texts[start:i + 1], None if encoded is None else encoded[start:i + 1])
                sigs[start:i + 1] = chunk
                band_keys[start:i + 1] = self._band_keys(chunk)
                start, acc = i + 1, 0
        return Sketch(sigs, lens, (sigs != _EMPTY).any(axis=1), band_keys)

    def _sketch_chunk(self, texts: Sequence[str], encoded: Sequence[bytes] | None = None) -> np.ndarray:
        n, k = len(texts), self.num_perm
        cap = self.max_chars
        if encoded is None:
            enc = [t[:cap].encode() for t in texts]
        else:  # an ASCII text's bytes are its characters
            enc = [e if len(e) <= cap and len(e) == len(t) else (e[:cap] if len(e) == len(t) else t[:cap].encode())
                   for t, e in zip(texts, encoded)]
        # 8 separator bytes of padding on both sides let the unaligned 8-byte reads below stay in bounds
        buf = b"\x00" * 8 + b"\x00".join(enc).translate(_WORD) + b"\x00" * 16
        arr = np.frombuffer(buf, dtype=np.uint8)
        w = arr != 0
        edges = np.flatnonzero(w[1:] != w[:-1]) + 1  # alternating word starts and ends
        starts, ends = edges[0::2], edges[1::2]
        out = np.full(n * k, _EMPTY, dtype=np.uint64)
        if len(starts):
            lens = ends - starts
            u = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))
            first = u[starts]
            first &= _BYTE_MASKS[np.minimum(lens, 8)]
            last = u[ends - 8]
            last *= lens > 8  # a word of up to 8 bytes is all in ``first``
            h = first * self._c1
            h ^= last * self._c2
            h += lens.astype(np.uint64)
            h ^= self._salt  # linear so far: the shingle hash below is mixed
            offs = np.cumsum(np.fromiter((len(e) + 1 for e in enc), dtype=np.int64, count=n)) + 8
            counts = np.diff(np.searchsorted(starts, offs), prepend=0)  # words per text
            doc = np.repeat(np.arange(n), counts)
            if len(doc) > 2:
                same = doc[:-2] == doc[2:]
                sh = h[:-2] * self._p1
                sh += h[1:-1] * self._p2
                sh += h[2:]
                sh = _mix(sh)[same]
                sd = doc[:-2][same]
            else:
                sh, sd = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
            few = np.flatnonzero((counts > 0) & (counts < 3))
            if len(few):  # texts with 1-2 words: their words are the shingles
                first_word = np.cumsum(counts) - counts
                short = np.concatenate([first_word[few], (first_word[few] + 1)[counts[few] == 2]])
                short.sort()
                sh = np.concatenate([sh, _mix(h[short] * self._p1)])
                sd = np.concatenate([sd, doc[short]])
            bins = (sh >> _U64(64 - self._log_k)).astype(np.int64)
            bins += sd * k
            np.minimum.at(out, bins, sh & _VAL_MASK)
        return out.reshape(n, k)

    def _band_keys(self, sigs: np.ndarray) -> np.ndarray:
        n = len(sigs)
        v = sigs.reshape(n, self.bands, self.rows)
        keys = (v * self._band_mul).sum(axis=2, dtype=np.uint64) ^ self._band_salt
        keys = _mix(keys)
        # a band with fewer than 2 filled bins is no key: on short texts such bands collide on one
        # shared common phrase, and the candidates they bring cost more than the recall they add
        keys[np.count_nonzero(v != _EMPTY, axis=2) < 2] = _EMPTY
        return keys

    # ---------- index ----------

    def add(self, key: Hashable, text: str) -> Match | None:
        return self.add_many([key], [text])[0]

    def query(self, text: str) -> Match | None:
        return self.query_many([text])[0]

    def add_many(self, keys: Sequence[Hashable], texts: Sequence[str] | None = None, *,
                 sketch: Sketch | None = None) -> list[Match | None]:
        """For each text in order: the earlier indexed text it nearly duplicates (then it is not
        inserted), or None (then it is inserted under its key). ``sketch`` (this index's
        :meth:`sketch` of the texts) may stand in for the texts."""
        if sketch is None:
            if texts is None:
                raise ValueError("add_many needs the texts or their sketch")
            if len(keys) != len(texts):
                raise ValueError("keys and texts differ in length")
            sketch = self.sketch(texts)
        n, m = len(sketch.lens), len(self._keys)
        if len(keys) != n:
            raise ValueError("keys and texts differ in length")
        if n == 0:
            return []
        sigs, lens, has = sketch.sigs, sketch.lens, sketch.has
        fk = sketch.band_keys.copy()
        fk[~has] = _EMPTY
        flat = fk.ravel()
        real = flat != _EMPTY
        if m:
            lo = np.searchsorted(self._fk, flat, side="left")
            hi = np.searchsorted(self._fk, flat, side="right")
            frozen_hit = ((hi > lo) & real).reshape(n, self.bands)
            lo, hi = lo.reshape(n, self.bands), hi.reshape(n, self.bands)
        else:
            frozen_hit = np.zeros((n, self.bands), dtype=bool)
        order = np.argsort(flat)  # an unstable sort (several times faster) ...
        sf = flat[order]
        eq = sf[1:] == sf[:-1]
        run = np.zeros(len(sf), dtype=bool)
        run[1:] |= eq
        run[:-1] |= eq
        run &= sf != _EMPTY
        sub = np.flatnonzero(run)
        if len(sub):  # ... made stable where it matters: equal real keys keep their insertion order
            o = order[sub]
            order[sub] = o[np.lexsort((o, sf[sub]))]
        multi_sorted = np.zeros(len(sf), dtype=bool)
        multi_sorted[1:] |= eq
        multi_sorted[:-1] |= eq
        multi = np.empty_like(multi_sorted)
        multi[order] = multi_sorted
        multi &= real
        multi = multi.reshape(n, self.bands)
        involved = np.flatnonzero((multi | frozen_hit).any(axis=1))
        results: list[Match | None] = [None] * n
        inserted = has.copy()
        if len(involved):
            all_sigs = np.concatenate([self._sigs, sigs]) if m else sigs
            all_lens = np.concatenate([self._lens, lens])
            all_keys = self._keys + list(keys) if m else keys
        groups: dict[int, list[int]] = {}  # batch-internal colliding keys -> ids (m + i) inserted so far
        for i in involved.tolist():
            cands: list[int] = []
            fh, mu = frozen_hit[i], multi[i]
            for j in np.flatnonzero(fh | mu).tolist():
                if fh[j]:
                    cands.extend(self._fo[lo[i, j]:hi[i, j]].tolist())
                if mu[j]:
                    cands.extend(groups.get(int(fk[i, j]), ()))
            match = self._verify(cands, sigs[i], int(lens[i]), all_sigs, all_lens, all_keys) if cands else None
            if match is not None:
                results[i] = match
                inserted[i] = False
                continue
            for j in np.flatnonzero(mu).tolist():
                groups.setdefault(int(fk[i, j]), []).append(m + i)
        sel = np.flatnonzero(inserted)
        new_keys = [keys[i] for i in sel.tolist()]
        if not new_keys:
            return results
        new_ids = np.full(n, -1, dtype=np.int64)
        new_ids[sel] = np.arange(m, m + len(sel))
        self._sigs = np.concatenate([self._sigs, sigs[sel]]) if m else sigs[sel]
        self._lens = np.concatenate([self._lens, lens[sel]])
        self._keys.extend(new_keys)
        # the batch's keys in sorted order (``order`` is stable, so owners stay in insertion order)
        owner = new_ids[order // self.bands]
        keep = (owner >= 0) & (sf != _EMPTY)
        bk, bo = sf[keep], owner[keep]
        if m:
            allk, allo = np.concatenate([self._fk, bk]), np.concatenate([self._fo, bo])
            o2 = np.argsort(allk, kind="stable")
            self._fk, self._fo = allk[o2], allo[o2]
        else:
            self._fk, self._fo = bk, bo
        return results

    def query_many(self, texts: Sequence[str]) -> list[Match | None]:
        """For each text: the indexed text it nearly duplicates, or None. Nothing is inserted."""
        n = len(texts)
        if n == 0 or not self._keys:
            return [None] * n
        sigs, lens, has, fk = self.sketch(texts)
        lo = np.searchsorted(self._fk, fk, side="left")
        hi = np.searchsorted(self._fk, fk, side="right")
        hit = (hi > lo) & has[:, None] & (fk != _EMPTY)
        results: list[Match | None] = [None] * n
        for i in np.flatnonzero(hit.any(axis=1)).tolist():
            cands: list[int] = []
            for j in np.flatnonzero(hit[i]).tolist():
                cands.extend(self._fo[lo[i, j]:hi[i, j]].tolist())
            results[i] = self._verify(cands, sigs[i], int(lens[i]), self._sigs, self._lens, self._keys)
        return results

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Estimated Jaccard between signature ``a`` and each row of ``b``: equal filled bins over
        bins filled in either (Li, Owen & Zhang's estimator for one-permutation hashing)."""
        fa = a != _EMPTY
        both = np.count_nonzero((a == b) & fa, axis=-1)
        either = np.count_nonzero(fa | (b != _EMPTY), axis=-1)
        return both / np.maximum(either, 1)

    def _verify(self, cands: list[int], sig: np.ndarray, length: int, sigs: np.ndarray, lens: np.ndarray,
                keys: Sequence[Hashable]) -> Match | None:
        """``cands``: row ids into ``sigs``/``lens``/``keys`` (the index, possibly followed by a batch)."""
        ids = sorted(set(cands))
        sims = self.similarity(sig, sigs[ids])
        cl = lens[ids]
        ok = sims >= self.threshold
        if self.max_chars < max(length, int(cl.max())):  # a text was cut: sizes must agree too
            ok &= ~((cl > self.max_chars) | (length > self.max_chars)) | (
                np.minimum(cl, length) >= self.threshold * np.maximum(cl, length))
        if not ok.any():
            return None
        best = int(np.argmax(np.where(ok, sims, -1.0)))  # most similar; ties: the earliest
        return Match(keys[ids[best]], round(float(sims[best]), 4))


def jaccard_words(a: str, b: str, k: int = 3) -> float:
    """Exact Jaccard of the word-k-shingle sets with the index's tokenisation (for tests and audits)."""
    def sh(t: str) -> set:
        words = t.encode().translate(_WORD).replace(b"\x00", b" ").split()
        return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)} if len(words) >= k else {tuple(words)}
    x, y = sh(a), sh(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def find_near_duplicates(texts: Iterable[str], threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> list[Match | None]:
    texts = list(texts)
    return NearDupIndex(threshold, seed=seed).add_many(list(range(len(texts))), texts)
