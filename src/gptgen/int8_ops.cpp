// gptgen::int8_dynamic_linear: y = x W^T with W int8 (one scale per output row) and x quantized to int8 per
// row at run time (symmetric, max|x| / 127), products summed in int32 by AVX512-VNNI (vpdpbusd).
//
// A decode step multiplies one row (or a few) by every weight matrix once: its time is the time to stream
// the weights. Weight-only int8 kernels convert every weight to floating point first and run below the
// cache bandwidth; dpbusd multiplies 64 int8 pairs per instruction, which leaves the stream the only cost.
//
// Layout: the weight (N, K) is packed as (ceil(N/16), Kp/4, 16, 4): for each block of 16 output rows, four
// consecutive k of all 16 rows lie in one 64-byte line, the operand of one dpbusd. Kp is K padded to a
// multiple of 16 (zeros). dpbusd multiplies unsigned by signed bytes, so activations go in as q + 128 and
// 128 * sum_k W[n, k] ("offset") comes off the int32 sums.
//
// Numbers (gptgen.int8_ops.reference computes the same ones with PyTorch operations):
//   amax = max(max_k |x[m, k]|, 1e-12); q = round_half_even(x * (127 / amax)); xs = amax / 127
//   y[m, n] = float(sum_k q * W[n, k]) * xs * wscale[n] + bias[n]     (float32, left to right)
// Built with -ffp-contract=off so no multiply and add fuse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// y (M, N) float32 = the product for M rows already quantized (q: M x Kp bytes, xs: M scales).
void gemv_rows(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp, const int32_t* off,
               const float* ws, const float* bp, int64_t Nb, int64_t N, float* yp) {
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
  std::vector<uint8_t> q(M * Kp);
  std::vector<float> xs(M);
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), M, K, Kp, q.data(), xs.data());
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), M, K, Kp, q.data(), xs.data());
  const bool has_bias = bias.has_value() && bias->defined();
  gemv_rows(q.data(), xs.data(), M, Kp, packed.data_ptr<int8_t>(), offset.data_ptr<int32_t>(),
            wscale.data_ptr<float>(), has_bias ? bias->data_ptr<float>() : nullptr, Nb, N, y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY(gptgen, m) {
  m.def("int8_dynamic_linear(Tensor x, Tensor packed, Tensor offset, Tensor wscale, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptgen, CPU, m) { m.impl("int8_dynamic_linear", &int8_dynamic_linear); }
