// Philox4x32-10 and the random keep decision of the CUDA kernels (cuda_kernels.cu), written
// once for the device and the host. The CPU extension compiles the host version
// (bindings.cpp: cuda_random_keep_host), so the tests check on any machine that the CUDA
// source draws the masks of fastmerge/philox.py and of the cpu backend, bit for bit; on the
// device the same lines run with the CUDA intrinsics below, whose results are defined exactly
// (high word of a 32x32 product, round-to-nearest conversion and product).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fmphilox {

constexpr uint32_t PH_M0 = 0xD2511F53u, PH_M1 = 0xCD9E8D57u;
constexpr uint32_t PH_W0 = 0x9E3779B9u, PH_W1 = 0xBB67AE85u;
constexpr float UNIFORM_SCALE = 5.9604644775390625e-08f;  // 2^-24

FM_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

// The four words of counter (g, stream) under key seed: fastmerge/philox.py's layout, where
// element i uses word i & 3 of counter g = i >> 2.
FM_HD void philox(uint64_t g, uint32_t stream, uint64_t seed, uint32_t w[4]) {
    uint32_t c0 = (uint32_t)g, c1 = (uint32_t)(g >> 32), c2 = stream, c3 = 0u;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r) {
        const uint32_t hi0 = umulhi(PH_M0, c0), lo0 = PH_M0 * c0;
        const uint32_t hi1 = umulhi(PH_M1, c2), lo1 = PH_M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c2 = hi0 ^ c3 ^ k1;
        c1 = lo1;
        c3 = lo0;
        k0 += PH_W0;
        k1 += PH_W1;
    }
    w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}

// The top 24 bits of a word as a float in [0, 1): both steps are exact.
FM_HD float uniform(uint32_t w) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(__uint2float_rn(w >> 8), UNIFORM_SCALE);
#else
    return (float)(w >> 8) * UNIFORM_SCALE;
#endif
}

// Keep decisions of elements i0 .. i0+3 (i0 a multiple of 4) of stream `stream`: bit j set
// when uniform(word j) < prob.
FM_HD uint32_t random_keep4(uint64_t seed, uint32_t stream, int64_t i0, float prob) {
    uint32_t w[4];
    philox((uint64_t)i0 >> 2, stream, seed, w);
    uint32_t bits = 0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int j = 0; j < 4; ++j) bits |= (uint32_t)(uniform(w[j]) < prob) << j;
    return bits;
}

// Keep decision of element i alone (the DELLA kernel draws one element per thread)
FM_HD bool random_keep1(uint64_t seed, uint32_t stream, int64_t i, float prob) {
    uint32_t w[4];
    philox((uint64_t)i >> 2, stream, seed, w);
    const int64_t q = i & 3;  // a select chain, not w[i & 3]: keeps w in registers
    const uint32_t word = q == 0 ? w[0] : q == 1 ? w[1] : q == 2 ? w[2] : w[3];
    return uniform(word) < prob;
}

}  // namespace fmphilox
