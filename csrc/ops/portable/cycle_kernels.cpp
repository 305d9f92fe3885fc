// Portable implementations of merge_, reset_ and prune_ in ATen ops, registered for every device
// without a native kernel (CompositeExplicitAutograd: CUDA and the rest). Philox words and normals
// are bit-identical to the C kernels' (normals: on devices whose fp32 ops round to nearest, as the C
// kernel's do). Temporaries are chunked so that none is the size of W.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "ops/common.h"
#include "ops/portable/cycle_kernels.h"

extern "C" {
#include "kernels/philox.h"
#include "kernels/prune.h"
}

namespace relora {
namespace {

constexpr int64_t kMask32 = 0xffffffffLL;

// Words [first, first + n) of Philox4x32-10 stream (seed, offset), as int64 in [0, 2^32).
at::Tensor philox_words(uint64_t seed, uint64_t offset, int64_t first, int64_t n,
                        const at::Device& device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  if (n == 0) return at::empty({0}, opts);
  const int64_t b0 = first / 4, b1 = (first + n - 1) / 4 + 1;
  at::Tensor block = at::arange(b0, b1, opts);
  at::Tensor c0 = block.bitwise_and(kMask32), c1 = block.bitwise_right_shift(32);
  at::Tensor c2 = at::full_like(c0, static_cast<int64_t>(offset & kMask32));
  at::Tensor c3 = at::full_like(c0, static_cast<int64_t>(offset >> 32));
  int64_t k0 = static_cast<int64_t>(seed & kMask32), k1 = static_cast<int64_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    // 32x32 -> 64-bit products wrap in int64 but keep their bit pattern.
    at::Tensor p0 = c0 * int64_t{0xD2511F53}, p1 = c2 * int64_t{0xCD9E8D57};
    at::Tensor hi0 = p0.bitwise_right_shift(32).bitwise_and(kMask32), lo0 = p0.bitwise_and(kMask32);
    at::Tensor hi1 = p1.bitwise_right_shift(32).bitwise_and(kMask32), lo1 = p1.bitwise_and(kMask32);
    c0 = hi1.bitwise_xor(c1).bitwise_xor(k0);
    c1 = lo1;
    c2 = hi0.bitwise_xor(c3).bitwise_xor(k1);
    c3 = lo0;
    k0 = (k0 + 0x9E3779B9LL) & kMask32;
    k1 = (k1 + 0xBB67AE85LL) & kMask32;
  }
  return at::stack({c0, c1, c2, c3}, 1).reshape(-1).narrow(0, first - 4 * b0, n);
}

// Elements [first, first + n) of the N(0, 1) stream (seed, offset), as float32: the fp32 Box-Muller
// of philox.h, one op per fp32 operation of the C kernel and in the same order, so that the result is
// bit-identical wherever each op rounds to nearest (integer steps are done in int64).
at::Tensor normal_stream(uint64_t seed, uint64_t offset, int64_t first, int64_t n,
                         const at::Device& device) {
  const int64_t b0 = first / 4, b1 = (first + n - 1) / 4 + 1;
  at::Tensor w = philox_words(seed, offset, 4 * b0, 4 * (b1 - b0), device).view({-1, 2, 2});
  at::Tensor w0 = w.select(2, 0), w1 = w.select(2, 1);
  // ln u(w0): u = 2^k (1 + f), then FreeBSD's logf polynomial
  at::Tensor u = (w0.bitwise_right_shift(8) + 1).to(at::kFloat) * 0x1.0p-24f;
  at::Tensor i = u.view(at::kInt).to(at::kLong) + 0x004AFB0D;
  at::Tensor k = (i.bitwise_right_shift(23) - 127).to(at::kFloat);
  at::Tensor f = (i.bitwise_and(0x7FFFFF) + 0x3F3504F3).to(at::kInt).view(at::kFloat) - 1.0f;
  at::Tensor s = f / (f + 2.0f);
  at::Tensor z = s * s, ww = z * z;
  at::Tensor R = z * (ww * PHILOX_L3 + PHILOX_L1) + ww * (ww * PHILOX_L4 + PHILOX_L2);
  at::Tensor h = f * 0.5f * f;
  at::Tensor ln = s * (h + R) + k * PHILOX_LN2_LO - h + f + k * PHILOX_LN2_HI;
  // sqrt in double, then rounded: correctly rounded like the C kernel's (torch's fp32 CPU sqrt is
  // not always: it can be 1 ulp off).
  at::Tensor radius = (ln * -2.0f).to(at::kDouble).sqrt().to(at::kFloat);
  // (cos, sin) of 2 pi u(w1) = (q + g) pi/2, reduced exactly in integers
  at::Tensor j = w1.bitwise_right_shift(8) + 1;
  at::Tensor q = (j + (1 << 21)).bitwise_right_shift(22);
  at::Tensor g = (j - q * (1 << 22)).to(at::kFloat) * 0x1.0p-22f;
  at::Tensor x = g * g;
  at::Tensor sg = g * (x * (x * (x * PHILOX_S7 + PHILOX_S5) + PHILOX_S3) + PHILOX_S1);
  at::Tensor cg = x * (x * (x * (x * PHILOX_C8 + PHILOX_C6) + PHILOX_C4) + PHILOX_C2) + 1.0f;
  at::Tensor quad = q.bitwise_and(3), odd = quad.bitwise_and(1).to(at::kBool);
  at::Tensor cr = at::where(odd, sg, cg), sr = at::where(odd, cg, sg);
  at::Tensor cos_t = at::where(quad.eq(1) | quad.eq(2), -cr, cr);
  at::Tensor sin_t = at::where(quad.ge(2), -sr, sr);
  at::Tensor zz = at::stack({radius * cos_t, radius * sin_t}, 2).reshape(-1);
  return zz.narrow(0, first - 4 * b0, n);
}

// Round fp32 values `v` into `dtype` stochastically with the Philox words `words` (same shape).
at::Tensor round_stochastic(const at::Tensor& v, const at::Tensor& words, at::ScalarType dtype) {
  if (dtype == at::kFloat) return v;
  at::Tensor nearest = v.to(dtype);
  if (dtype == at::kBFloat16) {
    // Add 16 random bits below bf16's last bit, then truncate.
    at::Tensor bits = v.view(at::kInt).to(at::kLong).bitwise_and(kMask32);
    at::Tensor up = (bits + words.bitwise_and(0xffff)).bitwise_and(0xffff0000LL);
    at::Tensor trunc = up.bitwise_right_shift(16).to(at::kShort).view(at::kBFloat16);
    return at::where(v.isfinite() & trunc.isfinite(), trunc, nearest);
  }
  // fp16: with lo <= |v| <= hi the neighbouring fp16 magnitudes, round to hi iff
  // word < p * 2^32, p = (|v| - lo) / (hi - lo) in fp32 (as f32_to_f16_sr in merge.c).
  at::Tensor ax = v.abs();
  at::Tensor h = ax.to(at::kHalf), hf = h.to(at::kFloat);
  at::Tensor hbits = h.view(at::kShort).to(at::kInt);
  at::Tensor lo = at::where(hf < ax, hbits, hbits - 1);
  at::Tensor lof = lo.to(at::kShort).view(at::kHalf).to(at::kFloat);
  at::Tensor hif = (lo + 1).to(at::kShort).view(at::kHalf).to(at::kFloat);
  at::Tensor p = (ax - lof) / (hif - lof);
  at::Tensor up = words.to(at::kDouble).lt(p.to(at::kDouble) * 4294967296.0);
  at::Tensor sign = v.view(at::kInt).bitwise_right_shift(16).bitwise_and(0x8000);
  at::Tensor r = (lo + up.to(at::kInt)).bitwise_or(sign).to(at::kShort).view(at::kHalf);
  return at::where((hf == ax) | ~(ax <= 65504.0f), nearest, r);
}

}  // namespace

void merge_portable(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double scale,
                    c10::string_view rounding, int64_t seed) {
  check_merge_args(W, A, B);
  kernel_dtype(W, "merge_", "W");
  kernel_dtype(A, "merge_", "A");
  check_f32_scalar(scale, "merge_", "scale", false);
  check_disjoint("merge_", "W", W, "A", A);
  check_disjoint("merge_", "W", W, "B", B);
  const relora_rounding mode = parse_rounding(rounding);
  TORCH_CHECK_VALUE(A.isfinite().all().item<bool>() && B.isfinite().all().item<bool>(),
                    "merge_: ", relora_status_string(RELORA_ERR_NONFINITE));
  const at::Tensor Af = A.to(at::kFloat), Bf = B.to(at::kFloat);
  const int64_t O = W.size(0), I = W.size(1);
  // Rows per chunk: an fp32 temporary of about 16 MiB at most.
  const int64_t rows = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(I, 1));
  for (int64_t i0 = 0; i0 < O; i0 += rows) {
    const int64_t m = std::min(rows, O - i0);
    at::Tensor Wc = W.narrow(0, i0, m);
    at::Tensor acc = at::addmm(Wc.to(at::kFloat), Bf.narrow(0, i0, m), Af, 1.0, scale);
    if (mode == RELORA_ROUND_STOCHASTIC && W.scalar_type() != at::kFloat) {
      at::Tensor words = philox_words(as_u64(seed), 0, i0 * I, m * I, W.device()).view({m, I});
      acc = round_stochastic(acc, words, W.scalar_type());
    }
    Wc.copy_(acc);
  }
}

void reset_portable(const at::Tensor& A, const at::Tensor& B, double std, int64_t seed,
                    int64_t offset) {
  check_reset_args(A, B, std);
  check_disjoint("reset_", "B", B, "A", A);
  B.zero_();
  if (A.numel() == 0) return;
  at::Tensor z = normal_stream(as_u64(seed), as_u64(offset), 0, A.numel(), A.device());
  A.copy_((z.to(at::kFloat) * static_cast<float>(std)).view(A.sizes()));
}

at::Tensor prune_portable(const at::Tensor& x, double ratio, c10::string_view mode, int64_t seed,
                          int64_t offset) {
  kernel_dtype(x, "prune_", "x");
  TORCH_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "prune_: ratio must be in [0, 1], got ", ratio);
  const int64_t n = x.numel();
  at::Tensor flat = x.view(-1);
  if (mode == "random") {
    const double t = std::floor((1.0 - ratio) * 4294967296.0);
    at::Tensor keep = philox_words(as_u64(seed), as_u64(offset), 0, n, x.device()).lt(
        static_cast<int64_t>(t));
    flat.masked_fill_(keep.logical_not(), 0);
    return keep.sum();
  }
  TORCH_CHECK_VALUE(mode == "magnitude", "prune_: mode must be 'magnitude' or 'random', got '",
                    std::string(mode), "'");
  const int64_t k = prune_keep_count(n, ratio);
  if (k == n) return at::scalar_tensor(n, x.options().dtype(at::kLong));
  if (k == 0) {
    flat.zero_();
    return at::scalar_tensor(0, x.options().dtype(at::kLong));
  }
  // Magnitude keys: the bits of |x|, so NaN ranks above Inf as in the C kernel.
  at::Tensor key = x.scalar_type() == at::kFloat
                       ? flat.view(at::kInt).bitwise_and(0x7fffffff)
                       : flat.view(at::kShort).to(at::kInt).bitwise_and(0x7fff);
  at::Tensor T = std::get<0>(key.kthvalue(n - k + 1));
  at::Tensor keep = key.gt(T);
  at::Tensor tie = key.eq(T);
  at::Tensor need = k - keep.sum();
  keep.logical_or_(tie.logical_and(tie.cumsum(0).le(need)));
  flat.masked_fill_(keep.logical_not(), 0);
  return at::scalar_tensor(k, x.options().dtype(at::kLong));
}

void uniform_portable(const at::Tensor& x, int64_t seed, int64_t offset) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "uniform_: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), "uniform_: x must be contiguous, got strides ", x.strides());
  if (x.numel() == 0) return;
  // u = (word >> 8 + 1) 2^-24 in (0, 1], as the C kernels' philox_uniform_open0: integer steps, exact
  at::Tensor w = philox_words(as_u64(seed), as_u64(offset), 0, x.numel(), x.device());
  x.copy_(((w.bitwise_right_shift(8) + 1).to(at::kFloat) * 0x1.0p-24f).view(x.sizes()));
}

#ifndef RELORA_TESTING_MODULE  // the test-only module (csrc/testing/) registers its copy as relora_testing ops
TORCH_LIBRARY_IMPL(relora, CompositeExplicitAutograd, m) {
  m.impl("uniform_", &uniform_portable);
  m.impl("merge_", &merge_portable);
  m.impl("reset_", &reset_portable);
  m.impl("prune_", &prune_portable);
}
#endif

}  // namespace relora
