// Calls effattn::fwd through the dispatcher, as a C++ user would, and checks
// out and lse against plain ATen: softmax(Q K^T * scale) V on float32 inputs,
// causal (top-left aligned: the band's right side 0) and not, on the widest
// kernel variant effattn::cpu_isas() says runs here. Exits non-zero on a mismatch.
//
// libeffattn is linked (--no-as-needed) only for its static op registrations;
// this file uses the full ATen C++ API, which only csrc/ must avoid.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

using FwdSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_lengths,
    const std::optional<at::Tensor>& query_lengths, double scale, std::optional<int64_t> window_left,
    std::optional<int64_t> window_right, int64_t variant);

constexpr double kTolerance = 1e-4;

// Returns the max abs error of out and of lse.
std::pair<double, double> check(const c10::TypedOperatorHandle<FwdSignature>& fwd,
                                bool is_causal, int64_t variant) {
  const int64_t B = 2, H = 3, L = 37, S = 45, E = 16;
  const double scale = 1.0 / std::sqrt(static_cast<double>(E));
  at::Tensor q = at::randn({B, H, L, E});
  at::Tensor k = at::randn({B, H, S, E});
  at::Tensor v = at::randn({B, H, S, E});

  // The band: query i sees keys i - left <= j <= i + right (nullopt: unbounded).
  const std::optional<int64_t> right = is_causal ? std::optional<int64_t>(0) : std::nullopt;
  auto [out, lse] = fwd.call(q, k, v, std::nullopt, std::nullopt, std::nullopt, scale,
                             /*window_left=*/std::nullopt, right, variant);

  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * scale;  // (B, H, L, S)
  if (is_causal) {  // query i sees keys j <= i
    at::Tensor visible = at::ones({L, S}, at::kBool).tril();
    scores = scores.masked_fill(visible.logical_not(), -INFINITY);
  }
  at::Tensor ref_out = at::matmul(at::softmax(scores, -1), v);
  at::Tensor ref_lse = at::logsumexp(scores, -1);

  TORCH_CHECK(out.sizes() == ref_out.sizes(), "out has shape ", out.sizes(),
              ", expected ", ref_out.sizes());
  TORCH_CHECK(lse.sizes() == ref_lse.sizes(), "lse has shape ", lse.sizes(),
              ", expected ", ref_lse.sizes());
  return {(out - ref_out).abs().max().item<double>(), (lse - ref_lse).abs().max().item<double>()};
}

int main() {
  at::manual_seed(0);
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("effattn::fwd", "");
  if (!handle.hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    std::fprintf(stderr, "FAIL: effattn::fwd has no CPU kernel (was libeffattn loaded?)\n");
    return 1;
  }
  auto fwd = handle.typed<FwdSignature>();
  // The kernel variant: the widest ISA (csrc/cpu/kernels.h: 0 baseline, 1 avx2, 2 avx512)
  // among those this build holds and this CPU runs.
  const int64_t isas = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("effattn::cpu_isas", "")
                           .typed<int64_t()>()
                           .call();
  int64_t variant = 0;
  for (int64_t isa : {1, 2})
    if (isas >> isa & 1) variant = isa;

  bool ok = true;
  for (bool is_causal : {false, true}) {
    auto [err_out, err_lse] = check(fwd, is_causal, variant);
    const bool pass = err_out <= kTolerance && err_lse <= kTolerance;
    std::printf("%s is_causal=%d variant=%lld: max |out - ref| = %.3g, max |lse - ref| = %.3g (tol %.0e)\n",
                pass ? "ok  " : "FAIL", is_causal, static_cast<long long>(variant), err_out, err_lse, kTolerance);
    ok = ok && pass;
  }
  return ok ? 0 : 1;
}
