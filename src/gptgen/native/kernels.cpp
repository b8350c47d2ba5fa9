// gptgen's native kernels: the int8 x int8 product of quantize="int8-dynamic" (gptgen::int8_dynamic_linear)
// and the one-token decode step of a float32, int8-dynamic or weight-only int8 GPT (gptgen.Int8Decoder), on one
// of several instruction-set paths chosen at run time (gptgen::set_isa, from gptgen.hardware's detection):
//
//   0 portable   plain C++ (generic.h) for the baseline instruction set: any CPU and compiler
//   1 avx2       AVX2 + FMA: int8 sums by vpmaddubsw / vpmaddwd, fp32 and int8-weight products by FMA, 8-wide
//                quantization, attention and activation; the rest generic.h, vectorized by the compiler
//   2 avx512     AVX512F/BW/VL + AVX512-VNNI: int8 sums by vpdpbusd, 16-wide products and helpers
//   3 amx        the avx512 path, with AMX tiles (tdpbusd) for products of 5 rows or more
//
// The library is compiled for the baseline instruction set; each path's functions are compiled with their
// own target (#pragma GCC target), so one build serves every x86-64 CPU and a mask can force a lower path
// (tests check every path the CPU can run against the reference). ARM64 builds the portable path; a NEON
// (sdot) path would be one more namespace with the two products, like avx2's.
//
// A decode step multiplies one row (or a few) by every weight matrix once: its time is the time to stream
// the weights. The weight-only int8 product widens each weight to float in registers (reading a quarter of
// fp32's bytes, at two conversions per 16 weights and pass); int8 x int8 sums need no conversion at all.
//
// Layout: the weight (N, K) is packed as (ceil(N/16), Kp/4, 16, 4): for each block of 16 output rows, four
// consecutive k of all 16 rows lie in one 64-byte line, the operand of one dpbusd (two vpmaddubsw on AVX2).
// Kp is K padded to a multiple of 16 (zeros). Activations are stored as q + 128 (dpbusd multiplies unsigned
// by signed bytes; 128 * sum_k W[n, k], "offset", comes off its sums); the other paths take q back.
//
// Numbers (gptgen.native.int8.reference computes the same ones with PyTorch operations), on every path:
//   amax = max(max_k |x[m, k]|, 1e-12); q = round_half_even(x * (127 / amax)); xs = amax / 127
//   y[m, n] = float(sum_k q * W[n, k]) * xs * wscale[n] + bias[n]     (float32, left to right)
// Built with -ffp-contract=off so no multiply and add fuse unless a kernel asks for it (the fp32 FMA products).
#include <ATen/core/Tensor.h>  // (not ATen/ATen.h: the build parses a quarter less)
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(GPTGEN_PORTABLE_ONLY)  // (-DGPTGEN_PORTABLE_ONLY: what
#include <immintrin.h>                                                         // a non-x86 CPU builds)
#define GPTGEN_X86 1
#endif

namespace {

constexpr int64_t kBlock = 16;

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t Kp, uint8_t* q, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(row[k])));
    amax = std::max(amax, 1e-12f);
    const float inv = 127.0f / amax;
    scales[m] = amax / 127.0f;
    uint8_t* out = q + m * Kp;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyintf(static_cast<float>(row[k]) * inv);
      out[k] = static_cast<uint8_t>(static_cast<int32_t>(v) + 128);
    }
    std::fill(out + K, out + Kp, static_cast<uint8_t>(128));  // padding: zero once the offset comes off
  }
}

// What attention needs: the new rows' q (in qkv), the cache of one layer, where each row attends.
template <typename T>
struct AttnArgs {
  const float* qkv;
  float* out;
  const T* kc;
  const T* vc;
  int64_t T_, B, H, D, Lmax, mask_stride;
  const int64_t* mask;
  const int64_t* slots;
  float scale;
  bool bf16;
};

namespace portable {
#include "generic.h"
}  // namespace portable

#ifdef GPTGEN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "generic.h"

// R activation rows against one block of 16 output rows (two 8-wide halves), U independent sums per half.
// vpmaddubsw multiplies unsigned by signed bytes into saturating int16 pair sums: with |w| (at most 128) as
// the unsigned operand and q carrying w's sign (|q| <= 127), a pair sums to at most 2 * 128 * 127 < 2^15,
// so nothing saturates and the int32 sums (vpmaddwd by ones) are exact.
template <int R, int U>
inline void block_rows(const int8_t* blk, const uint8_t* q, int64_t Kp, const float* ws, const float* bias,
                       const float* xs, float* y, int64_t ldy, int64_t nn) {
  __m256i acc[R][2 * U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2 * U; ++u) acc[r][u] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < Kp; k += 4 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + (k + 4 * u) * kBlock));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + (k + 4 * u) * kBlock + 32));
      const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
      for (int r = 0; r < R; ++r) {
        int32_t xk;
        std::memcpy(&xk, q + r * Kp + k + 4 * u, sizeof(xk));
        const __m256i xb = _mm256_xor_si256(_mm256_set1_epi32(xk), flip);  // q + 128 -> q
        const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0));
        const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1));
        acc[r][2 * u] = _mm256_add_epi32(acc[r][2 * u], _mm256_madd_epi16(p0, ones));
        acc[r][2 * u + 1] = _mm256_add_epi32(acc[r][2 * u + 1], _mm256_madd_epi16(p1, ones));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[kBlock];
    for (int h = 0; h < 2; ++h) {
      __m256i sum = acc[r][h];
      for (int u = 1; u < U; ++u) sum = _mm256_add_epi32(sum, acc[r][2 * u + h]);
      __m256 v = _mm256_cvtepi32_ps(sum);
      v = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(xs[r])), _mm256_load_ps(ws + 8 * h)),
                        _mm256_load_ps(bias + 8 * h));
      _mm256_store_ps(out + 8 * h, v);
    }
    std::memcpy(y + r * ldy, out, nn * sizeof(float));
  }
}

// e^x as generic.h's exp_s computes it (the same operations in the same order, so the same numbers), 8 at a time.
inline __m256 exp_v(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// activate (generic.h's numbers: ReLU, tanh GELU with exp_v; erf GELU element by element), 8 at a time
inline void activate_v(float* v, int64_t n, int64_t activation, bool bf16) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    if (activation != 1)
      for (; i + 8 <= i1; i += 8) {
        const __m256 a = _mm256_loadu_ps(v + i);
        __m256 out;
        if (activation == 0) {
          out = _mm256_max_ps(a, _mm256_setzero_ps());
        } else {
          const __m256 a3 = _mm256_mul_ps(_mm256_mul_ps(a, a), a);
          const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                         _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), a3), a));
          out = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_v(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
        }
        _mm256_storeu_ps(v + i, out);
        if (bf16) round_bf16(v + i, 8);
      }
    activate_range(v, i, i1, activation, bf16);
  });
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

constexpr int64_t kMaxChunks8 = 32;  // head widths up to 256 in vector registers; wider heads take generic.h's

// One new query per row and head against the cache: scores by 8-wide FMAs (the last D % 8 in scalar),
// softmax with exp_v, the weighted sum of values by FMAs. generic.h's attend_heads in vectors.
template <typename T>
inline void attend_heads_v(const AttnArgs<T>& a, int64_t i0, int64_t i1) {
  const int64_t H = a.H, D = a.D, inner = H * D, T_ = a.T_, full = D / 8;
  std::vector<float> s(a.Lmax), tail(D);
  __m256 qv[kMaxChunks8], acc[kMaxChunks8];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, hh = i % H, L = a.slots[b] + 1;
    const float* q = a.qkv + b * 3 * inner + hh * D;
    const T* kr = a.kc + (b * H + hh) * T_ * D;
    const T* vr = a.vc + (b * H + hh) * T_ * D;
    for (int64_t c = 0; c < full; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) {
      if (a.mask && !a.mask[b * a.mask_stride + t]) { s[t] = -INFINITY; continue; }
      __m256 dot = _mm256_setzero_ps();
      for (int64_t c = 0; c < full; ++c) dot = _mm256_fmadd_ps(qv[c], load8(kr + t * D + 8 * c), dot);
      float d = hsum(dot);
      for (int64_t e = 8 * full; e < D; ++e) d += q[e] * static_cast<float>(kr[t * D + e]);
      s[t] = d * a.scale;
      mx = std::max(mx, s[t]);
    }
    __m256 vsum = _mm256_setzero_ps();
    const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= L; t += 8) {  // e^(s - max), 0 where masked
      const __m256 v = _mm256_loadu_ps(s.data() + t);
      const __m256 e = _mm256_and_ps(_mm256_cmp_ps(v, ninf, _CMP_NEQ_OQ), exp_v(_mm256_sub_ps(v, vmx)));
      _mm256_storeu_ps(s.data() + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; t < L; ++t) {
      s[t] = s[t] == -INFINITY ? 0.f : exp_s(s[t] - mx);
      sum += s[t];
    }
    for (int64_t c = 0; c < full; ++c) acc[c] = _mm256_setzero_ps();
    std::fill(tail.begin(), tail.end(), 0.f);
    for (t = 0; t < L; ++t) {
      if (s[t] == 0.f) continue;
      const float p = s[t] / sum;
      const __m256 pv = _mm256_set1_ps(p);
      for (int64_t c = 0; c < full; ++c) acc[c] = _mm256_fmadd_ps(pv, load8(vr + t * D + 8 * c), acc[c]);
      for (int64_t e = 8 * full; e < D; ++e) tail[e] += p * static_cast<float>(vr[t * D + e]);
    }
    float* o = a.out + b * inner + hh * D;
    for (int64_t c = 0; c < full; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
    for (int64_t e = 8 * full; e < D; ++e) o[e] = tail[e];
    if (a.bf16) round_bf16(o, D);
  }
}

template <typename T>
inline void attend_v(const AttnArgs<T>& a) {
  if (a.D > 8 * kMaxChunks8) return attend(a);
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t i0, int64_t i1) { attend_heads_v(a, i0, i1); });
}

// Rows of x quantized as quantize_rows does (the same numbers): |x| max, x * (127 / amax) rounded half to even
// (vroundps), + 128, the low byte of each int32 kept.
inline void quantize_v(const float* x, int64_t M, int64_t K, int64_t Kp, uint8_t* q, float* scales) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m256 mx = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + k), absmask), mx);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float amax = 0.f;
    for (int j = 0; j < 8; ++j) amax = std::max(amax, lanes[j]);
    for (int64_t t = k; t < K; ++t) amax = std::max(amax, std::fabs(row[t]));
    amax = std::max(amax, 1e-12f);
    const float inv = 127.0f / amax;
    scales[m] = amax / 127.0f;
    uint8_t* out = q + m * Kp;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (k = 0; k + 8 <= K; k += 8) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + k), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i b = _mm256_shuffle_epi8(_mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(128)), low_bytes);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, order)));
    }
    for (; k < K; ++k) out[k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyintf(row[k] * inv)) + 128);
    std::fill(out + K, out + Kp, static_cast<uint8_t>(128));
  }
}

inline void gemv_i8_v_blocks(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp,
                             const float* ws, const float* bp, int64_t N, float* yp, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* blk = wp + b * Kp * kBlock;
    const int64_t n0 = b * kBlock, nn = std::min<int64_t>(kBlock, N - n0);
    alignas(32) float s[kBlock] = {0.f}, bb[kBlock] = {0.f};
    std::memcpy(s, ws + n0, nn * sizeof(float));
    if (bp) std::memcpy(bb, bp + n0, nn * sizeof(float));
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) block_rows<4, 1>(blk, qp + m * Kp, Kp, s, bb, xsp + m, yp + m * N + n0, N, nn);
    switch (M - m) {
      case 3: block_rows<3, 1>(blk, qp + m * Kp, Kp, s, bb, xsp + m, yp + m * N + n0, N, nn); break;
      case 2: block_rows<2, 2>(blk, qp + m * Kp, Kp, s, bb, xsp + m, yp + m * N + n0, N, nn); break;
      case 1: block_rows<1, 2>(blk, qp + m * Kp, Kp, s, bb, xsp + m, yp + m * N + n0, N, nn); break;
      default: break;
    }
  }
}

inline void gemv_i8_v(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp, const int32_t*,
                      const float* ws, const float* bp, int64_t Nb, int64_t N, float* yp) {
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) { gemv_i8_v_blocks(qp, xsp, M, Kp, wp, ws, bp, N, yp, b0, b1); });
}

// fp32 and weight-only int8 products: each k is one line of 16 outputs (64 bytes of float32, or 16 int8 widened
// to two 8-float vectors by vpmovsxbd + vcvtdq2ps once for the R rows) times the broadcast activation (FMA);
// int8 sums are scaled per output at the end.
inline void line16(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}
inline void line16(const int8_t* p, __m256& lo, __m256& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
}

template <typename W, int R, int U>
inline void block_rows16(const W* blk, const float* x, int64_t K, const float* ws, const float* bias, float* y,
                         int64_t ldy, int64_t nn) {
  __m256 acc[R][2 * U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < 2 * U; ++u) acc[r][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      __m256 w0, w1;
      line16(blk + (k + u) * kBlock, w0, w1);
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_set1_ps(x[r * K + k + u]);
        acc[r][2 * u] = _mm256_fmadd_ps(xb, w0, acc[r][2 * u]);
        acc[r][2 * u + 1] = _mm256_fmadd_ps(xb, w1, acc[r][2 * u + 1]);
      }
    }
  for (; k < K; ++k) {
    __m256 w0, w1;
    line16(blk + k * kBlock, w0, w1);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_set1_ps(x[r * K + k]);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[kBlock];
    for (int h = 0; h < 2; ++h) {
      __m256 sum = acc[r][h];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[r][2 * u + h]);
      if constexpr (std::is_same_v<W, int8_t>) sum = _mm256_mul_ps(sum, _mm256_load_ps(ws + 8 * h));
      _mm256_store_ps(out + 8 * h, _mm256_add_ps(sum, _mm256_load_ps(bias + 8 * h)));
    }
    std::memcpy(y + r * ldy, out, nn * sizeof(float));
  }
}

// R rows at a time (4, then the 3/2/1-row tail with more independent sums each)
template <typename W>
inline void row_groups16(const W* blk, const float* x, int64_t M, int64_t K, const float* s, const float* bb, float* y,
                         int64_t N, int64_t nn) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block_rows16<W, 4, 1>(blk, x + m * K, K, s, bb, y + m * N, N, nn);
  switch (M - m) {
    case 3: block_rows16<W, 3, 1>(blk, x + m * K, K, s, bb, y + m * N, N, nn); break;
    case 2: block_rows16<W, 2, 2>(blk, x + m * K, K, s, bb, y + m * N, N, nn); break;
    case 1: block_rows16<W, 1, 4>(blk, x + m * K, K, s, bb, y + m * N, N, nn); break;
    default: break;
  }
}

// y = x W^T (* ws) + bias for W float32 or int8 (ws: the int8 scales; unused for float32). With more than 4 rows
// an int8 block is widened to float once (a per-thread buffer that stays in L1/L2) and the float product runs
// over every row: the same sums as the int8 kernel (same U per row group), without widening per 4 rows.
template <typename W>
inline void gemv16_v(const float* x, int64_t M, int64_t K, const W* wp, const float* ws, const float* bp, int64_t Nb,
                     int64_t N, float* y) {
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) {
    static thread_local std::vector<float> wide;
    alignas(32) static const float zero[kBlock] = {0.f};
    for (int64_t b = b0; b < b1; ++b) {
      const W* blk = wp + b * K * kBlock;
      const int64_t n0 = b * kBlock, nn = std::min<int64_t>(kBlock, N - n0);
      alignas(32) float s[kBlock] = {0.f}, bb[kBlock] = {0.f};
      if (ws) std::memcpy(s, ws + n0, nn * sizeof(float));
      if (bp) std::memcpy(bb, bp + n0, nn * sizeof(float));
      if constexpr (std::is_same_v<W, int8_t>) {
        if (M > 4) {
          wide.resize(K * kBlock);
          for (int64_t k = 0; k < K; ++k) {
            __m256 lo, hi;
            line16(blk + k * kBlock, lo, hi);
            _mm256_storeu_ps(wide.data() + k * kBlock, lo);
            _mm256_storeu_ps(wide.data() + k * kBlock + 8, hi);
          }
          row_groups16<float>(wide.data(), x, M, K, nullptr, zero, y + n0, N, nn);
          for (int64_t r = 0; r < M; ++r) {  // sum * scale + bias, as block_rows16<int8_t> ends
            float* yr = y + r * N + n0;
            for (int64_t n = 0; n < nn; ++n) yr[n] = yr[n] * s[n] + bb[n];
          }
          continue;
        }
      }
      row_groups16(blk, x, M, K, s, bb, y + n0, N, nn);
    }
  });
}

inline void gemv_f32_v(const float* x, int64_t M, int64_t K, const float* wp, const float* bp, int64_t Nb, int64_t N,
                       float* y) {
  gemv16_v(x, M, K, wp, nullptr, bp, Nb, N, y);
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // GPTGEN_X86

#ifdef GPTGEN_X86
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__) && !defined(GPTGEN_NO_AMX)
#define GPTGEN_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#pragma GCC push_options
#ifdef GPTGEN_AMX
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")
#else
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#endif
namespace avx512 {

std::atomic<bool> use_tiles{false};  // the amx path (set_isa 3)

// R activation rows against one block of 16 output rows, with U independent sums per row: dpbusd takes
// several cycles, and a single chain of them would leave a one-row product waiting on its latency.
template <int R, int U>
inline void block_rows(const int8_t* blk, const uint8_t* q, int64_t Kp, __m512i offset, __m512 wscale,
                       __m512 bias, const float* xs, float* y, int64_t ldy, __mmask16 mask) {
  __m512i acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 4 * U) {
    for (int u = 0; u < U; ++u) {
      const __m512i w = _mm512_loadu_si512(blk + (k + 4 * u) * kBlock);
      for (int r = 0; r < R; ++r) {
        int32_t xk;
        std::memcpy(&xk, q + r * Kp + k + 4 * u, sizeof(xk));
        acc[r][u] = _mm512_dpbusd_epi32(acc[r][u], _mm512_set1_epi32(xk), w);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512i sum = acc[r][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_epi32(sum, acc[r][u]);
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, offset));
    v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(xs[r])), wscale), bias);
    _mm512_mask_storeu_ps(y + r * ldy, mask, v);
  }
}


#ifdef GPTGEN_AMX
// AMX: for several rows the product is arithmetic, not bytes, and one tile instruction (tdpbusd) multiplies
// a 16 x 64 block of activations by a 64 x 16 block of weights. The packed weight block is already the B
// tile's layout (16 rows of 4 k x 16 outputs), so a tile is 1 KiB at a 64-byte stride; activations load as
// 16 rows of 64 bytes. The int32 sums are the same as the dpbusd path's.

bool amx_enabled() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void amx_store(const int32_t (*c)[16], const float* xsp, int64_t rows, const int32_t* off, const float* ws,
                      const float* bp, int64_t N, int64_t n0, float* y) {
  const int64_t nn = std::min<int64_t>(kBlock, N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1u);
  const __m512i o = _mm512_maskz_loadu_epi32(mask, off + n0);
  const __m512 s = _mm512_maskz_loadu_ps(mask, ws + n0);
  const __m512 bb = bp ? _mm512_maskz_loadu_ps(mask, bp + n0) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(c[r]), o));
    v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(xsp[r])), s), bb);
    _mm512_mask_storeu_ps(y + r * N + n0, mask, v);
  }
}

// y for blocks [b0, b1), every row: two blocks at a time (sums in tiles 0 and 1), activations in tile 2,
// weights in tiles 3 and 4. q holds M rows rounded up to 16 (padding rows are 128: zero products).
void amx_rows(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp, const int32_t* off,
              const float* ws, const float* bp, int64_t N, float* yp, int64_t b0, int64_t b1) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  alignas(64) int32_t c[2][16][16];
  for (int64_t b = b0; b < b1; b += 2) {
    const bool pair = b + 1 < b1;
    const int8_t* w0 = wp + b * Kp * kBlock;
    const int8_t* w1 = w0 + Kp * kBlock;
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = 0; k < Kp; k += 64) {
        // the next pair's weights on their way: tile loads alone leave the memory system idle between them
        const int8_t* next = w0 + 2 * Kp * kBlock + 2 * k * kBlock;
        if (m0 == 0 && b + 2 < b1)
          for (int64_t line = 0; line < 2 * 64 * kBlock; line += 64) _mm_prefetch(reinterpret_cast<const char*>(next + line), _MM_HINT_T0);
        _tile_loadd(2, qp + m0 * Kp + k, Kp);
        _tile_loadd(3, w0 + k * kBlock, 64);
        _tile_dpbusd(0, 2, 3);
        if (pair) {
          _tile_loadd(4, w1 + k * kBlock, 64);
          _tile_dpbusd(1, 2, 4);
        }
      }
      const int64_t rows = std::min<int64_t>(16, M - m0);
      _tile_stored(0, c[0], 64);
      amx_store(c[0], xsp + m0, rows, off, ws, bp, N, b * kBlock, yp + m0 * N);
      if (pair) {
        _tile_stored(1, c[1], 64);
        amx_store(c[1], xsp + m0, rows, off, ws, bp, N, (b + 1) * kBlock, yp + m0 * N);
      }
    }
  }
  _tile_release();
}
#endif

// Rows of x quantized as quantize_rows does (the same numbers), 16 at a time; vpmovdb keeps each int32's low byte.
inline void quantize(const float* x, int64_t M, int64_t K, int64_t Kp, uint8_t* q, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 msk = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1u);
      mx = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(msk, row + k)), mx);  // (a NaN |x| leaves mx)
    }
    const float amax = std::max(_mm512_reduce_max_ps(mx), 1e-12f);
    const float inv = 127.0f / amax;
    scales[m] = amax / 127.0f;
    uint8_t* out = q + m * Kp;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 msk = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1u);
      const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(msk, row + k), vinv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm512_mask_cvtepi32_storeu_epi8(out + k, msk, _mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(128)));
    }
    std::fill(out + K, out + Kp, static_cast<uint8_t>(128));
  }
}

// Rows from which AMX takes over (fewer rows stream the weights at the same speed either way).
constexpr int64_t kAmxMinRows = 5;

// Whether the product of M rows (packed width Kp) runs on AMX tiles
inline bool use_amx(int64_t M, int64_t Kp) {
#ifdef GPTGEN_AMX
  return M >= kAmxMinRows && Kp % 64 == 0 && use_tiles.load(std::memory_order_relaxed) && amx_enabled();
#else
  return false;
#endif
}

// y (M, N) float32 = the product for M rows already quantized (q: M x Kp bytes, xs: M scales).
void gemv_rows(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp, const int32_t* off,
               const float* ws, const float* bp, int64_t Nb, int64_t N, float* yp) {
#ifdef GPTGEN_AMX
  if (use_amx(M, Kp)) {
    at::parallel_for(0, Nb, 2, [&](int64_t b0, int64_t b1) { amx_rows(qp, xsp, M, Kp, wp, off, ws, bp, N, yp, b0, b1); });
    return;
  }
#endif
  // Blocks of output rows split across threads; every row group of x passes over a block while it is in L1,
  // so the weights stream once whatever the number of rows.
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* blk = wp + b * Kp * kBlock;
      const int64_t n0 = b * kBlock, nn = std::min<int64_t>(kBlock, N - n0);
      const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1u);
      const __m512i o = _mm512_maskz_loadu_epi32(mask, off + n0);
      const __m512 s = _mm512_maskz_loadu_ps(mask, ws + n0);
      const __m512 bb = bp ? _mm512_maskz_loadu_ps(mask, bp + n0) : _mm512_setzero_ps();
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) block_rows<4, 1>(blk, qp + m * Kp, Kp, o, s, bb, xsp + m, yp + m * N + n0, N, mask);
      switch (M - m) {
        case 3: block_rows<3, 1>(blk, qp + m * Kp, Kp, o, s, bb, xsp + m, yp + m * N + n0, N, mask); break;
        case 2: block_rows<2, 2>(blk, qp + m * Kp, Kp, o, s, bb, xsp + m, yp + m * N + n0, N, mask); break;
        case 1: block_rows<1, 4>(blk, qp + m * Kp, Kp, o, s, bb, xsp + m, yp + m * N + n0, N, mask); break;
        default: break;
      }
    }
  });
}

// fp32 and weight-only int8 products of the native step: W packed as (ceil(N/16), K, 16), so each k is one line of
// 16 outputs (64 bytes of float32, or 16 int8 widened to floats by vpmovsxbd + vcvtdq2ps once for the R rows),
// multiplied by the broadcast activation (FMA); int8 sums are scaled per output at the end.
inline __m512 line16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 line16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <typename W, int R, int U>
inline void block_rows16(const W* blk, const float* x, int64_t K, __m512 wscale, __m512 bias, float* y, int64_t ldy,
                         __mmask16 mask) {
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U)
    for (int u = 0; u < U; ++u) {
      const __m512 w = line16(blk + (k + u) * kBlock);
      for (int r = 0; r < R; ++r) acc[r][u] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + u]), w, acc[r][u]);
    }
  for (; k < K; ++k) {
    const __m512 w = line16(blk + k * kBlock);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m512 sum = acc[r][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[r][u]);
    if constexpr (std::is_same_v<W, int8_t>) sum = _mm512_mul_ps(sum, wscale);
    _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_add_ps(sum, bias));
  }
}

// y = x W^T (* ws) + bias for W float32 or int8 (ws: the int8 scales; unused for float32)
template <typename W>
void gemv16(const float* x, int64_t M, int64_t K, const W* wp, const float* ws, const float* bp, int64_t Nb, int64_t N,
            float* y) {
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const W* blk = wp + b * K * kBlock;
      const int64_t n0 = b * kBlock, nn = std::min<int64_t>(kBlock, N - n0);
      const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1u);
      const __m512 s = ws ? _mm512_maskz_loadu_ps(mask, ws + n0) : _mm512_setzero_ps();
      const __m512 bb = bp ? _mm512_maskz_loadu_ps(mask, bp + n0) : _mm512_setzero_ps();
      int64_t m = 0;
      if constexpr (std::is_same_v<W, int8_t>)  // 8 rows a pass (their sums fit the 32 vector registers): each
        for (; m + 8 <= M; m += 8)              // k's bytes widened once per 8 FMAs (fp32 measured no gain)
          block_rows16<W, 8, 1>(blk, x + m * K, K, s, bb, y + m * N + n0, N, mask);
      for (; m + 4 <= M; m += 4) block_rows16<W, 4, 2>(blk, x + m * K, K, s, bb, y + m * N + n0, N, mask);
      switch (M - m) {
        case 3: block_rows16<W, 3, 2>(blk, x + m * K, K, s, bb, y + m * N + n0, N, mask); break;
        case 2: block_rows16<W, 2, 4>(blk, x + m * K, K, s, bb, y + m * N + n0, N, mask); break;
        case 1: block_rows16<W, 1, 8>(blk, x + m * K, K, s, bb, y + m * N + n0, N, mask); break;
        default: break;
      }
    }
  });
}

void gemv_f32(const float* x, int64_t M, int64_t K, const float* wp, const float* bp, int64_t Nb, int64_t N, float* y) {
  gemv16(x, M, K, wp, nullptr, bp, Nb, N, y);
}

// Vector helpers of the decode step ---------------------------------------------------------------------------
// float -> bfloat16 -> float with round-to-nearest-even, as c10::BFloat16 rounds (NaN stays NaN).
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), nan, v);
}

inline void round_bf16(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, round_bf16(_mm512_loadu_ps(v + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(v + i, m, round_bf16(_mm512_maskz_loadu_ps(m, v + i)));
  }
}

// e^x for |x| <= 88: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7 (relative error
// below 2e-7), scaled by 2^n.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GELU with tanh: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3)
inline __m512 gelu_tanh(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// 16 bf16 or float values as floats (masked: the first n < 16)
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

constexpr int64_t kMaxChunks = 16;  // head widths up to 256 here; wider heads take the AVX2 path's attention

template <typename T>
inline void attend_heads(const AttnArgs<T>& a, int64_t i0, int64_t i1) {
  const int64_t H = a.H, D = a.D, inner = H * D, T_ = a.T_, Lmax = a.Lmax, mask_stride = a.mask_stride;
  const int64_t chunks = (D + 15) / 16;
  const float scale = a.scale;
  const bool bf16 = a.bf16;
  const int64_t* mask = a.mask;
  const int64_t* slots = a.slots;
  const float* qkv = a.qkv;
  float* out = a.out;
  const T* kc = a.kc;
  const T* vc = a.vc;
  std::vector<float> s(Lmax);
  __m512 qv[kMaxChunks], acc[kMaxChunks];  // (no std::vector of vector registers: its code is not this target's)
  __mmask16 dm[kMaxChunks];
  for (int64_t c = 0; c < chunks; ++c) dm[c] = static_cast<__mmask16>((1u << std::min<int64_t>(16, D - 16 * c)) - 1u);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, hh = i % H, L = slots[b] + 1;
    const float* qp = qkv + b * 3 * inner + hh * D;
    for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_maskz_loadu_ps(dm[c], qp + 16 * c);
    const T* kr = kc + (b * H + hh) * T_ * D;
    const T* vr = vc + (b * H + hh) * T_ * D;
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) {
      if (mask && !mask[b * mask_stride + t]) { s[t] = -INFINITY; continue; }
      __m512 dot = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) dot = _mm512_fmadd_ps(qv[c], load16(kr + t * D + 16 * c, dm[c]), dot);
      s[t] = _mm512_reduce_add_ps(dot) * scale;
      mx = std::max(mx, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < L; t += 16) {  // e^(s - max), 0 where masked
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, L - t)) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(m, s.data() + t);
      const __mmask16 live = _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(v, _mm512_set1_ps(mx))));
      _mm512_mask_storeu_ps(s.data() + t, m, e);
      sum += _mm512_reduce_add_ps(e);
    }
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      if (s[t] == 0.f) continue;
      const __m512 p = _mm512_set1_ps(s[t] / sum);
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vr + t * D + 16 * c, dm[c]), acc[c]);
    }
    float* op = out + b * inner + hh * D;
    for (int64_t c = 0; c < chunks; ++c) _mm512_mask_storeu_ps(op + 16 * c, dm[c], bf16 ? round_bf16(acc[c]) : acc[c]);
  }
}

template <typename T>
inline void attend(const AttnArgs<T>& a) {
  if (a.D > 16 * kMaxChunks) return avx2::attend_v(a);
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t i0, int64_t i1) { attend_heads(a, i0, i1); });
}

inline void activate_range(float* v, int64_t n, int64_t c0, int64_t c1, int64_t activation, bool bf16) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i = 16 * c;
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1u);
    __m512 a = _mm512_maskz_loadu_ps(m, v + i);
    if (activation == 0) {
      a = _mm512_max_ps(a, _mm512_setzero_ps());
    } else if (activation == 2) {
      a = gelu_tanh(a);
    } else {
      alignas(64) float t[16];
      _mm512_store_ps(t, a);
      for (int j = 0; j < 16; ++j) t[j] = 0.5f * t[j] * (1.0f + std::erf(t[j] * static_cast<float>(M_SQRT1_2)));
      a = _mm512_load_ps(t);
    }
    _mm512_mask_storeu_ps(v + i, m, bf16 ? round_bf16(a) : a);
  }
}

inline void activate(float* v, int64_t n, int64_t activation, bool bf16) {
  at::parallel_for(0, (n + 15) / 16, 256, [&](int64_t c0, int64_t c1) { activate_range(v, n, c0, c1, activation, bf16); });
}

// x += y, rounded to the model's dtype
inline void residual(float* x_, const float* y, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - i)) - 1u);
    __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, x_ + i), _mm512_maskz_loadu_ps(m, y + i));
    _mm512_mask_storeu_ps(x_ + i, m, bf16 ? round_bf16(v) : v);
  }
}
}  // namespace avx512
#pragma GCC pop_options
#endif  // GPTGEN_X86

// The paths' kernels, and the one in use -------------------------------------------------------------------
struct Ops {
  void (*quantize)(const float*, int64_t, int64_t, int64_t, uint8_t*, float*);
  void (*gemv_i8)(const uint8_t*, const float*, int64_t, int64_t, const int8_t*, const int32_t*, const float*,
                  const float*, int64_t, int64_t, float*);
  void (*gemv_f32)(const float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, float*);
  void (*gemv_w8)(const float*, int64_t, int64_t, const int8_t*, const float*, const float*, int64_t, int64_t, float*);
  void (*round_bf16)(float*, int64_t);
  void (*attend_f32)(const AttnArgs<float>&);
  void (*attend_bf16)(const AttnArgs<at::BFloat16>&);
  void (*activate)(float*, int64_t, int64_t, bool);
  void (*residual)(float*, const float*, int64_t, bool);
};

const Ops kPortableOps{quantize_rows<float>, portable::gemv_i8, portable::gemv_f32, portable::gemv_w8, portable::round_bf16, portable::attend<float>,
                       portable::attend<at::BFloat16>, portable::activate, portable::residual};
#ifdef GPTGEN_X86
const Ops kAvx2Ops{avx2::quantize_v, avx2::gemv_i8_v, avx2::gemv_f32_v, avx2::gemv16_v<int8_t>, avx2::round_bf16, avx2::attend_v<float>,
                   avx2::attend_v<at::BFloat16>, avx2::activate_v, avx2::residual};
const Ops kAvx512Ops{avx512::quantize, avx512::gemv_rows, avx512::gemv_f32, avx512::gemv16<int8_t>, static_cast<void (*)(float*, int64_t)>(avx512::round_bf16),
                     avx512::attend<float>, avx512::attend<at::BFloat16>, avx512::activate, avx512::residual};
#endif

// The highest path this build has: 3 with AMX, 2 on other x86-64 builds, 0 elsewhere.
constexpr int64_t kMaxIsa =
#if defined(GPTGEN_X86) && defined(GPTGEN_AMX)
    3;
#elif defined(GPTGEN_X86)
    2;
#else
    0;
#endif

std::atomic<int64_t> g_isa{0};  // the portable path until gptgen.native picks one for the CPU

inline const Ops& ops() {
#ifdef GPTGEN_X86
  const int64_t isa = g_isa.load(std::memory_order_relaxed);
  if (isa >= 2) return kAvx512Ops;
  if (isa == 1) return kAvx2Ops;
#endif
  return kPortableOps;
}

// Select the path (the caller has checked that the CPU runs it); returns the one in effect.
int64_t set_isa(int64_t level) {
  level = std::max<int64_t>(0, std::min(level, kMaxIsa));
  g_isa.store(level);
#ifdef GPTGEN_X86
  avx512::use_tiles.store(level >= 3);
#endif
  return level;
}

int64_t max_isa() { return kMaxIsa; }

// q rows: M rounded up to 16 (what the AMX tiles read), the padding 128 (zero once the offset comes off)
inline int64_t padded_rows(int64_t M) { return (M + 15) / 16 * 16; }

void check_weight(const at::Tensor& packed, const at::Tensor& offset, const at::Tensor& wscale,
                  const std::optional<at::Tensor>& bias, int64_t K, int64_t N) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kBlock && packed.size(3) == 4, "packed must be an int8 (N/16, Kp/4, 16, 4) tensor");
  const int64_t Nb = packed.size(0), Kp = packed.size(1) * 4;
  TORCH_CHECK(Kp % 16 == 0 && Kp >= K && Kp - K < 16 && Nb * kBlock >= N && (Nb - 1) * kBlock < N,
              "the packed weight does not match x's width or N");
  TORCH_CHECK(offset.scalar_type() == at::kInt && offset.is_contiguous() && offset.numel() == N, "offset: int32 (N,)");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() && wscale.numel() == N, "wscale: float32 (N,)");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 (N,)");
}

at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& offset,
                               const at::Tensor& wscale, const std::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1);
  check_weight(packed, offset, wscale, bias, K, N);
  const int64_t Nb = packed.size(0), Kp = packed.size(1) * 4;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y;
  std::vector<uint8_t> q(padded_rows(M) * Kp, static_cast<uint8_t>(128));
  std::vector<float> xs(M);
  if (x.scalar_type() == at::kFloat)
    ops().quantize(x.data_ptr<float>(), M, K, Kp, q.data(), xs.data());
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, Kp, q.data(), xs.data());
  const bool has_bias = bias.has_value() && bias->defined();
  ops().gemv_i8(q.data(), xs.data(), M, Kp, packed.data_ptr<int8_t>(), offset.data_ptr<int32_t>(),
            wscale.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr, Nb, N, y.data_ptr<float>());
  return y;
}



// Int8Decoder: the whole one-token decode step of a float32, int8-dynamic or weight-only int8 GPT in one call ---
//
// What GPT.forward does for one new token per row over the KV cache (pre-norm GPT-2 or post-norm KerasHub
// blocks, ReLU / GELU / tanh GELU), with every Linear one of the products above. A compiled step spends about as
// long in the glue between its ~50 kernels (calls, buffers, the per-call checks of torch.compile) as in the
// products; here the glue is a loop. Values are rounded to the model's dtype where the PyTorch model rounds
// them (each layer's output, the residual sums), so the step follows the eager model's numbers closely.
struct Product {
  // int8 x int8: packed (Nb, Kp/4, 16, 4) int8. fp32: packed (Nb, K, 16) float32 (offset, wscale unused).
  // Weight-only int8 (w8): packed (Nb, K, 16) int8 and wscale (offset unused).
  at::Tensor packed, offset, wscale, bias;
  int64_t K = 0, N = 0, Kp = 0, Nb = 0;
  bool f32 = false, w8 = false;
};

struct Int8Decoder : torch::CustomClassHolder {
  int64_t n_layer, C, H, D, inner, V;
  bool pre_norm, final_norm, bf16;
  int64_t activation;  // 0 relu, 1 gelu (erf), 2 gelu (tanh)
  double eps;
  at::Tensor wte, wpe, lnf_w, lnf_b;
  std::vector<at::Tensor> ln;  // per layer: ln_1 weight, bias, ln_2 weight, bias (float32)
  std::vector<Product> prods;  // per layer: c_attn, attn c_proj, c_fc, mlp c_proj; then the head
  std::vector<at::Tensor> cache;  // per layer: k, v (B, H, T, D)
  std::vector<float> x, h, buf, big;
  std::vector<uint8_t> q;
  std::vector<float> xs;

  static Product product(const std::vector<at::Tensor>& t, size_t i) {
    Product p{t[i], t[i + 1], t[i + 2], t[i + 3]};
    p.f32 = p.packed.scalar_type() == at::kFloat;
    p.w8 = p.packed.scalar_type() == at::kChar && p.packed.dim() == 3;
    p.Nb = p.packed.size(0);
    p.Kp = p.f32 || p.w8 ? p.packed.size(1) : p.packed.size(1) * 4;
    p.N = p.offset.numel();  // fp32 and w8 products: a placeholder of N elements
    return p;
  }

  Int8Decoder(std::vector<at::Tensor> t, std::vector<int64_t> ints, double eps_) : eps(eps_) {
    TORCH_CHECK(ints.size() == 9, "Int8Decoder: 9 sizes expected");
    n_layer = ints[0]; C = ints[1]; H = ints[2]; D = ints[3]; pre_norm = ints[4]; activation = ints[5];
    final_norm = ints[6]; V = ints[7]; bf16 = ints[8];
    inner = H * D;
    TORCH_CHECK(static_cast<int64_t>(t.size()) == 2 + 20 * n_layer + 2 + 4, "Int8Decoder: wrong number of tensors");
    wte = t[0]; wpe = t[1];
    const auto dt = bf16 ? at::kBFloat16 : at::kFloat;
    TORCH_CHECK(wte.scalar_type() == dt && wpe.scalar_type() == dt && wte.is_contiguous() && wpe.is_contiguous());
    const int64_t widths[4][2] = {{C, 3 * inner}, {inner, C}, {C, -1}, {-1, C}};
    size_t i = 2;
    for (int64_t l = 0; l < n_layer; ++l) {
      ln.push_back(t[i]); ln.push_back(t[i + 1]);
      for (int j = 0; j < 4; ++j) {
        Product p = product(t, i + 2 + 4 * j);
        p.K = widths[j][0] >= 0 ? widths[j][0] : prods.back().N;
        check_product(p);
        TORCH_CHECK(widths[j][1] < 0 || p.N == widths[j][1], "Int8Decoder: a layer's width does not match");
        prods.push_back(p);
      }
      ln.push_back(t[i + 18]); ln.push_back(t[i + 19]);
      i += 20;
    }
    lnf_w = t[i]; lnf_b = t[i + 1];
    Product head = product(t, i + 2);
    head.K = C;
    TORCH_CHECK(head.N == V, "Int8Decoder: the head's width does not match the vocabulary");
    check_product(head);
    prods.push_back(head);
    for (const auto& w : ln) TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == C);
  }

  static void check_product(const Product& p) {
    const std::optional<at::Tensor> bias = p.bias.numel() ? std::optional<at::Tensor>(p.bias) : std::nullopt;
    if (!p.f32 && !p.w8) {
      check_weight(p.packed, p.offset, p.wscale, bias, p.K, p.N);
      return;
    }
    TORCH_CHECK(p.packed.dim() == 3 && p.packed.is_contiguous() && p.packed.size(1) == p.K && p.packed.size(2) == kBlock &&
                p.Nb * kBlock >= p.N && (p.Nb - 1) * kBlock < p.N, "Int8Decoder: a weight of the wrong shape");
    if (p.w8)
      TORCH_CHECK(p.wscale.scalar_type() == at::kFloat && p.wscale.is_contiguous() && p.wscale.numel() == p.N,
                  "wscale: float32 (N,)");
    if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == p.N, "bias: float32 (N,)");
  }

  void set_cache(std::vector<at::Tensor> kv) {
    for (const auto& c : kv)
      TORCH_CHECK(c.dim() == 4 && c.is_contiguous() && c.size(1) == H && c.size(3) == D &&
                  c.scalar_type() == (bf16 ? at::kBFloat16 : at::kFloat), "Int8Decoder: a cache of the wrong shape or dtype");
    TORCH_CHECK(kv.empty() || static_cast<int64_t>(kv.size()) == 2 * n_layer, "Int8Decoder: one k and one v per layer");
    for (const auto& c : kv)
      TORCH_CHECK(c.sizes() == kv[0].sizes(), "Int8Decoder: every layer's cache must have the same shape");
    cache = std::move(kv);
  }

  inline float rnd(float v) const { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }

  float load(const at::Tensor& t, int64_t i) const {
    return bf16 ? static_cast<float>(t.data_ptr<at::BFloat16>()[i]) : t.data_ptr<float>()[i];
  }

  void layer_norm(const float* in, float* out, int64_t B, const at::Tensor& w, const at::Tensor& b) const {
    const float* wp = w.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) {
      const float* row = in + r * C;
      float mean = 0.f, var = 0.f;
      for (int64_t c = 0; c < C; ++c) mean += row[c];
      mean /= C;
      for (int64_t c = 0; c < C; ++c) var += (row[c] - mean) * (row[c] - mean);
      const float inv = 1.0f / std::sqrt(var / C + static_cast<float>(eps));
      for (int64_t c = 0; c < C; ++c) out[r * C + c] = rnd((row[c] - mean) * inv * wp[c] + bp[c]);
    }
  }

  // out (B, p.N) = the product of in (B, p.K), rounded to the model's dtype
  void linear(const Product& p, const float* in, float* out, int64_t B, bool round = true) {
    const float* bias = p.bias.numel() ? p.bias.data_ptr<float>() : nullptr;
    if (p.f32) {
      ops().gemv_f32(in, B, p.K, p.packed.data_ptr<float>(), bias, p.Nb, p.N, out);
    } else if (p.w8) {
      ops().gemv_w8(in, B, p.K, p.packed.data_ptr<int8_t>(), p.wscale.data_ptr<float>(), bias, p.Nb, p.N, out);
    } else {
      q.assign(padded_rows(B) * p.Kp, static_cast<uint8_t>(128));
      xs.resize(B);
      ops().quantize(in, B, p.K, p.Kp, q.data(), xs.data());
      ops().gemv_i8(q.data(), xs.data(), B, p.Kp, p.packed.data_ptr<int8_t>(), p.offset.data_ptr<int32_t>(),
                    p.wscale.data_ptr<float>(), bias, p.Nb, p.N, out);
    }
    if (round && bf16) ops().round_bf16(out, B * p.N);
  }

  // Row b writes its key and value at slots[b] and attends slots 0..slots[b] (those the mask marks, with one).
  template <typename T>
  void attend(int64_t l, const float* qkv, float* out, int64_t B, const int64_t* mask, int64_t mask_stride,
              const int64_t* slots) {
    T* kc = cache[2 * l].data_ptr<T>();
    T* vc = cache[2 * l + 1].data_ptr<T>();
    const int64_t T_ = cache[2 * l].size(2);
    // the new token's key and value into their slot
    for (int64_t b = 0; b < B; ++b)
      for (int64_t hh = 0; hh < H; ++hh)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t at = ((b * H + hh) * T_ + slots[b]) * D + d;
          kc[at] = static_cast<T>(qkv[b * 3 * inner + inner + hh * D + d]);
          vc[at] = static_cast<T>(qkv[b * 3 * inner + 2 * inner + hh * D + d]);
        }
    const int64_t Lmax = *std::max_element(slots, slots + B) + 1;
    const AttnArgs<T> args{qkv, out, kc, vc, T_, B, H, D, Lmax, mask_stride, mask, slots,
                           1.0f / std::sqrt(static_cast<float>(D)), bf16};
    if constexpr (std::is_same_v<T, float>) ops().attend_f32(args);
    else ops().attend_bf16(args);
  }

  void activate(float* v, int64_t n) const { ops().activate(v, n, activation, bf16); }

  // x += y, rounded to the model's dtype
  void residual(float* x_, const float* y, int64_t n) const { ops().residual(x_, y, n, bf16); }

  // The per-call engine's step: every row writes cache slot `slot`; row b's position is slot - pad_counts[b]
  // (left padding) and it attends the slots its mask row marks.
  std::tuple<at::Tensor, at::Tensor> step(at::Tensor tokens, at::Tensor pad_counts, at::Tensor mask, int64_t slot) {
    TORCH_CHECK(pad_counts.scalar_type() == at::kLong && mask.scalar_type() == at::kLong, "Int8Decoder: int64 pad counts and mask");
    TORCH_CHECK(mask.dim() == 2 && mask.stride(1) == 1 && mask.size(1) > slot && slot >= 0, "Int8Decoder: the slot is outside the mask");
    pad_counts = pad_counts.contiguous();
    const int64_t B = tokens.numel();
    TORCH_CHECK(pad_counts.numel() == B && mask.size(0) == B, "Int8Decoder: one pad count and one mask row per token");
    std::vector<int64_t> slots(B, slot), positions(B);
    const int64_t* pad = pad_counts.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) positions[b] = std::max<int64_t>(slot - pad[b], 0);
    return run(tokens, slots, positions, mask.data_ptr<int64_t>(), mask.stride(0));
  }

  // The serving engine's step: row b (cache row b) is at position positions[b], writes that slot and attends
  // every slot up to it.
  std::tuple<at::Tensor, at::Tensor> step_rows(at::Tensor tokens, at::Tensor positions) {
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == tokens.numel(), "Int8Decoder: one int64 position per token");
    positions = positions.contiguous();
    const int64_t* pp = positions.data_ptr<int64_t>();
    std::vector<int64_t> pos(pp, pp + positions.numel());
    for (int64_t p : pos) TORCH_CHECK(p >= 0, "Int8Decoder: a negative position");
    return run(tokens, pos, pos, nullptr, 0);
  }

  std::tuple<at::Tensor, at::Tensor> run(at::Tensor tokens, const std::vector<int64_t>& slots,
                                         const std::vector<int64_t>& positions, const int64_t* mp, int64_t ms) {
    TORCH_CHECK(static_cast<int64_t>(cache.size()) == 2 * n_layer, "Int8Decoder: set_cache first");
    TORCH_CHECK(tokens.scalar_type() == at::kLong, "Int8Decoder: int64 tokens");
    tokens = tokens.contiguous();
    const int64_t B = tokens.numel();
    TORCH_CHECK(B > 0 && cache[0].size(0) >= B, "Int8Decoder: more rows than the cache holds");
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(slots[b] >= 0 && slots[b] < cache[0].size(2), "Int8Decoder: a slot outside the cache");
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t ffn = prods[2].N;
    x.resize(B * C); h.resize(B * std::max(C, inner)); buf.resize(B * std::max({3 * inner, ffn, C}));
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < wte.size(0), "token id out of range");
      const int64_t pos = std::min(positions[b], wpe.size(0) - 1);
      for (int64_t c = 0; c < C; ++c) x[b * C + c] = rnd(load(wte, tok[b] * C + c) + load(wpe, pos * C + c));
    }
    std::vector<float> a(B * std::max(C, inner));
    for (int64_t l = 0; l < n_layer; ++l) {
      const Product* p = &prods[4 * l];
      const at::Tensor* n = &ln[4 * l];
      // attention
      const float* in = x.data();
      if (pre_norm) { layer_norm(x.data(), h.data(), B, n[0], n[1]); in = h.data(); }
      linear(p[0], in, buf.data(), B);
      if (bf16) attend<at::BFloat16>(l, buf.data(), a.data(), B, mp, ms, slots.data());
      else attend<float>(l, buf.data(), a.data(), B, mp, ms, slots.data());
      linear(p[1], a.data(), h.data(), B);
      residual(x.data(), h.data(), B * C);
      if (!pre_norm) layer_norm(x.data(), x.data(), B, n[0], n[1]);
      // MLP
      in = x.data();
      if (pre_norm) { layer_norm(x.data(), h.data(), B, n[2], n[3]); in = h.data(); }
      linear(p[2], in, buf.data(), B);
      activate(buf.data(), B * ffn);
      linear(p[3], buf.data(), h.data(), B);
      residual(x.data(), h.data(), B * C);
      if (!pre_norm) layer_norm(x.data(), x.data(), B, n[2], n[3]);
    }
    if (final_norm) layer_norm(x.data(), x.data(), B, lnf_w, lnf_b);
    at::Tensor hidden = at::from_blob(x.data(), {B, 1, C}, at::kFloat).to(bf16 ? at::kBFloat16 : at::kFloat, false, true);
    at::Tensor logits = at::empty({B, V}, at::kFloat);
    linear(prods.back(), x.data(), logits.data_ptr<float>(), B);
    return {logits, hidden};
  }
};

}  // namespace

TORCH_LIBRARY(gptgen, m) {
  m.class_<Int8Decoder>("Int8Decoder")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>())
      .def("set_cache", &Int8Decoder::set_cache)
      .def("step", &Int8Decoder::step)
      .def("step_rows", &Int8Decoder::step_rows);
  m.def("set_isa(int level) -> int", &set_isa);
  m.def("max_isa() -> int", &max_isa);
  m.def("int8_dynamic_linear(Tensor x, Tensor packed, Tensor offset, Tensor wscale, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptgen, CPU, m) { m.impl("int8_dynamic_linear", &int8_dynamic_linear); }
