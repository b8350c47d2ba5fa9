// The decode step's kernels in plain C++ (no intrinsics): included by kernels.cpp once per instruction-set
// path that has no hand-written kernel of its own. Compiled for the baseline instruction set it is the
// portable path (any CPU, any compiler: x86-64, ARM64, ...); compiled with AVX2 + FMA enabled, the compiler
// vectorizes its loops (the AVX2 path keeps these for everything but the two products). No include guard:
// each inclusion sits in its own namespace.
//
// Numbers: the int8 product gives exactly the int32 sums of every other path (and of
// gptgen.native.int8.reference), scaled in the same order; the fp32 product and the rest differ from the
// vector paths only in float rounding.

// y (M, N) = rows of q (M x Kp bytes, each value + 128) times the packed int8 weight, scaled per row and column.
inline void gemv_i8_blocks(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp,
                           const float* ws, const float* bp, int64_t N, float* yp, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* blk = wp + b * Kp * kBlock;
    const int64_t n0 = b * kBlock, nn = std::min<int64_t>(kBlock, N - n0);
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* q = qp + m * Kp;
      int32_t part[4 * kBlock] = {0};  // per output and k mod 4: one contiguous line, which vectorizes
      for (int64_t k = 0; k < Kp; k += 4) {
        const int8_t* w = blk + k * kBlock;  // 16 outputs x 4 k
        int32_t xv[4];
        for (int j = 0; j < 4; ++j) xv[j] = static_cast<int32_t>(q[k + j]) - 128;
        for (int i = 0; i < 4 * kBlock; ++i) part[i] += xv[i & 3] * static_cast<int32_t>(w[i]);
      }
      for (int64_t n = 0; n < nn; ++n) {
        const int32_t acc = part[4 * n] + part[4 * n + 1] + part[4 * n + 2] + part[4 * n + 3];
        float v = static_cast<float>(acc) * xsp[m] * ws[n0 + n];
        yp[m * N + n0 + n] = bp ? v + bp[n0 + n] : v;
      }
    }
  }
}

inline void gemv_i8(const uint8_t* qp, const float* xsp, int64_t M, int64_t Kp, const int8_t* wp, const int32_t*,
                    const float* ws, const float* bp, int64_t Nb, int64_t N, float* yp) {
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) { gemv_i8_blocks(qp, xsp, M, Kp, wp, ws, bp, N, yp, b0, b1); });
}

// y (M, N) = rows of x times a weight packed as (ceil(N/16), K, 16) of float32, or of int8 (weight-only int8:
// float activations, ws the scale per output): y[m, n] = (sum_k x[m, k] * float(W[n, k])) [* ws[n]] + bias[n]
template <typename W>
inline void gemv_blocks(const float* x, int64_t M, int64_t K, const W* wp, const float* ws, const float* bp, int64_t N,
                        float* y, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const W* blk = wp + b * K * kBlock;
    const int64_t n0 = b * kBlock, nn = std::min<int64_t>(kBlock, N - n0);
    for (int64_t m = 0; m < M; ++m) {
      float acc[kBlock] = {0.f};
      const float* xm = x + m * K;
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xm[k];
        const W* w = blk + k * kBlock;
        for (int n = 0; n < kBlock; ++n) acc[n] += xv * static_cast<float>(w[n]);
      }
      for (int64_t n = 0; n < nn; ++n) {
        const float v = ws ? acc[n] * ws[n0 + n] : acc[n];
        y[m * N + n0 + n] = bp ? v + bp[n0 + n] : v;
      }
    }
  }
}

inline void gemv_f32(const float* x, int64_t M, int64_t K, const float* wp, const float* bp, int64_t Nb, int64_t N,
                     float* y) {
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) { gemv_blocks(x, M, K, wp, nullptr, bp, N, y, b0, b1); });
}

inline void gemv_w8(const float* x, int64_t M, int64_t K, const int8_t* wp, const float* ws, const float* bp,
                    int64_t Nb, int64_t N, float* y) {
  at::parallel_for(0, Nb, 4, [&](int64_t b0, int64_t b1) { gemv_blocks(x, M, K, wp, ws, bp, N, y, b0, b1); });
}

// float -> bfloat16 -> float, round to nearest even (c10::BFloat16's rounding; NaN stays NaN)
inline float bf16_round(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if (std::isnan(v)) return v;
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline void round_bf16(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = bf16_round(v[i]);
}

// e^x, the same polynomial as the AVX-512 path's exp_ps (2^n built from its bits; e^x below 2^-126 is 0)
inline float exp_s(float x) {
  x = std::max(std::min(x, 88.0f), -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

inline void activate_range(float* v, int64_t i0, int64_t i1, int64_t activation, bool bf16) {
  for (int64_t i = i0; i < i1; ++i) {
    const float a = v[i];
    float out;
    if (activation == 0) {
      out = std::max(a, 0.f);
    } else if (activation == 2) {
      const float u = 0.7978845608028654f * (0.044715f * (a * a * a) + a);
      out = a / (1.0f + exp_s(-2.0f * u));
    } else {
      out = 0.5f * a * (1.0f + std::erf(a * static_cast<float>(M_SQRT1_2)));
    }
    v[i] = bf16 ? bf16_round(out) : out;
  }
}

inline void activate(float* v, int64_t n, int64_t activation, bool bf16) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) { activate_range(v, i0, i1, activation, bf16); });
}

inline void residual(float* x, const float* y, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] + y[i];
    x[i] = bf16 ? bf16_round(v) : v;
  }
}

template <typename T>
inline void attend_heads(const AttnArgs<T>& a, int64_t i0, int64_t i1) {
  const int64_t H = a.H, D = a.D, inner = H * D, T_ = a.T_;
  std::vector<float> s(a.Lmax), acc(D);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, hh = i % H, L = a.slots[b] + 1;
    const float* q = a.qkv + b * 3 * inner + hh * D;
    const T* kr = a.kc + (b * H + hh) * T_ * D;
    const T* vr = a.vc + (b * H + hh) * T_ * D;
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) {
      if (a.mask && !a.mask[b * a.mask_stride + t]) { s[t] = -INFINITY; continue; }
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * static_cast<float>(kr[t * D + d]);
      s[t] = dot * a.scale;
      mx = std::max(mx, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) {
      s[t] = s[t] == -INFINITY ? 0.f : exp_s(s[t] - mx);
      sum += s[t];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = 0; t < L; ++t) {
      if (s[t] == 0.f) continue;
      const float p = s[t] / sum;
      for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(vr[t * D + d]);
    }
    float* o = a.out + b * inner + hh * D;
    for (int64_t d = 0; d < D; ++d) o[d] = a.bf16 ? bf16_round(acc[d]) : acc[d];
  }
}

template <typename T>
inline void attend(const AttnArgs<T>& a) {
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t i0, int64_t i1) { attend_heads(a, i0, i1); });
}
