//! SHA-256 of a transfer's content, fast where the CPU has the SHA extensions.
//!
//! The agent's `sha2` is the compact software backend (small, and the proofs hash a few blocks
//! per connection): about 100 MB/s, a twentieth of what a socket moves. A transfer hashes every
//! byte, so where `cpuid` reports the SHA extensions (with SSSE3 and SSE4.1) the blocks go
//! through `sha256rnds2`/`sha256msg1`/`sha256msg2` instead (one small `unsafe` function, the
//! standard schedule from Intel's reference); elsewhere through `sha2::compress256`. The
//! buffering and padding are ours: sha2's `Digest` cannot be given another compression.
#![allow(unsafe_code)]

use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;

/// A SHA-256 under way.
pub struct Sha256 {
    state: [u32; 8],
    /// A partial block.
    buf: [u8; BLOCK],
    buffered: usize,
    /// Bytes hashed so far.
    len: u64,
    /// The CPU has the SHA extensions (x86_64 only; elsewhere always the software rounds).
    #[cfg(target_arch = "x86_64")]
    accelerated: bool,
}

const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256 {
            state: INITIAL,
            buf: [0; BLOCK],
            buffered: 0,
            len: 0,
            #[cfg(target_arch = "x86_64")]
            accelerated: accelerated(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        if self.buffered > 0 {
            let take = (BLOCK - self.buffered).min(data.len());
            let (head, rest) = data.split_at(take);
            if let Some(room) = self.buf.get_mut(self.buffered..self.buffered + take) {
                room.copy_from_slice(head);
            }
            self.buffered += take;
            data = rest;
            if self.buffered < BLOCK {
                return;
            }
            let block = self.buf;
            self.compress(&block);
            self.buffered = 0;
        }
        let whole = data.len() - data.len() % BLOCK;
        let (blocks, rest) = data.split_at(whole);
        self.compress(blocks);
        if let Some(room) = self.buf.get_mut(..rest.len()) {
            room.copy_from_slice(rest);
        }
        self.buffered = rest.len();
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        // The 0x80 byte, zeros to 56 bytes into a block, the length in bits.
        let pad = 1 + (BLOCK + 55 - self.buffered) % BLOCK;
        let mut tail = [0u8; BLOCK + 8];
        tail[0] = 0x80;
        let len = self.len;
        self.update(tail.get(..pad).unwrap_or(&[]));
        self.update(&bits.to_be_bytes());
        self.len = len;
        let mut out = [0u8; 32];
        for (bytes, word) in out.chunks_exact_mut(4).zip(self.state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Whole blocks (`blocks.len()` a multiple of 64).
    fn compress(&mut self, blocks: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.accelerated {
            // SAFETY: `accelerated` is true only when cpuid reported SHA, SSSE3 and SSE4.1,
            // the features `compress_shani` is compiled for.
            unsafe { compress_shani(&mut self.state, blocks) };
            return;
        }
        for block in blocks.chunks_exact(BLOCK) {
            sha2::compress256(&mut self.state, &[*GenericArray::from_slice(block)]);
        }
    }
}

/// Whether this CPU has the SHA extensions (and the SSSE3 and SSE4.1 the rounds use). Other
/// architectures always take the software rounds (only the tests ask there).
#[cfg(any(target_arch = "x86_64", test))]
fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{__cpuid, __cpuid_count};
        // cpuid exists on every x86_64 CPU. Leaf 7 is asked for only when leaf 0 says it is
        // there.
        #[allow(unused_unsafe)]
        let (max, leaf1, leaf7) = unsafe {
            let max = __cpuid(0).eax;
            let leaf7 = if max >= 7 { __cpuid_count(7, 0).ebx } else { 0 };
            (max, __cpuid(1).ecx, leaf7)
        };
        let ssse3 = leaf1 & (1 << 9) != 0;
        let sse41 = leaf1 & (1 << 19) != 0;
        let sha = leaf7 & (1 << 29) != 0;
        max >= 7 && ssse3 && sse41 && sha
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The round constants.
#[cfg(target_arch = "x86_64")]
static K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// Compresses the whole 64-byte blocks of `blocks` into `state` with the SHA extensions.
///
/// # Safety
/// The CPU must have SHA, SSSE3 and SSE4.1 ([`accelerated`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
unsafe fn compress_shani(state: &mut [u32; 8], blocks: &[u8]) {
    use core::arch::x86_64::*;
    // Big-endian words: reverse the bytes of each 32-bit lane.
    let mask = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
    // SAFETY (all loads and stores): unaligned 16-byte accesses within `state` (32 bytes),
    // `K` (256 bytes, at 16-byte steps below 64 words) and a 64-byte block.
    let state_ptr = state.as_mut_ptr() as *mut __m128i;
    let dcba = _mm_loadu_si128(state_ptr);
    let efgh = _mm_loadu_si128(state_ptr.add(1));
    let cdab = _mm_shuffle_epi32(dcba, 0xb1);
    let efgh = _mm_shuffle_epi32(efgh, 0x1b);
    let mut abef = _mm_alignr_epi8(cdab, efgh, 8);
    let mut cdgh = _mm_blend_epi16(efgh, cdab, 0xf0);
    for block in blocks.chunks_exact(BLOCK) {
        let (abef_save, cdgh_save) = (abef, cdgh);
        let data = block.as_ptr() as *const __m128i;
        let mut w = [_mm_setzero_si128(); 4];
        for (i, word) in w.iter_mut().enumerate() {
            *word = _mm_shuffle_epi8(_mm_loadu_si128(data.add(i)), mask);
        }
        for i in 0..16 {
            if i >= 4 {
                // w[i] from w[i-4..i], kept in a ring of four.
                let next = _mm_sha256msg2_epu32(
                    _mm_add_epi32(
                        _mm_sha256msg1_epu32(w[i & 3], w[(i + 1) & 3]),
                        _mm_alignr_epi8(w[(i + 3) & 3], w[(i + 2) & 3], 4),
                    ),
                    w[(i + 3) & 3],
                );
                w[i & 3] = next;
            }
            let k = _mm_loadu_si128(K.as_ptr().add(4 * i) as *const __m128i);
            let t = _mm_add_epi32(w[i & 3], k);
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, t);
            abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(t, 0x0e));
        }
        abef = _mm_add_epi32(abef, abef_save);
        cdgh = _mm_add_epi32(cdgh, cdgh_save);
    }
    let feba = _mm_shuffle_epi32(abef, 0x1b);
    let dchg = _mm_shuffle_epi32(cdgh, 0xb1);
    _mm_storeu_si128(state_ptr, _mm_blend_epi16(feba, dchg, 0xf0));
    _mm_storeu_si128(state_ptr.add(1), _mm_alignr_epi8(dchg, feba, 8));
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// cpuid agrees with the kernel (so the accelerated path above is tested where it exists).
    #[test]
    fn detection_agrees_with_the_kernel() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap();
        let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
        let expected = has("sha_ni") && has("ssse3") && has("sse4_1");
        assert_eq!(accelerated(), cfg!(target_arch = "x86_64") && expected);
    }

    /// Every length around block boundaries, fed whole and in odd pieces, on both paths.
    #[test]
    fn matches_sha2_on_both_paths() {
        let data: [u8; 1000] = core::array::from_fn(|i| (i * 31 + i / 7) as u8);
        for accelerated in [false, accelerated()] {
            for len in (0..200).chain([255, 256, 511, 512, 513, 999, 1000]) {
                let input = &data[..len];
                let expected: [u8; 32] = sha2::Sha256::digest(input).into();
                for piece in [1, 3, 63, 64, 65, 1000] {
                    let mut hasher = Sha256::new();
                    hasher.accelerated = accelerated;
                    for chunk in input.chunks(piece) {
                        hasher.update(chunk);
                    }
                    assert_eq!(hasher.finalize(), expected, "{accelerated} {len} {piece}");
                }
            }
        }
    }
}
