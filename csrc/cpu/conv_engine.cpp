// The conv2d engine choice (see conv_engine.h) and the ATen engine: ATen's convolution for the GEMM
// part, the fused epilogue (+ residual, activation, saved pre-activation) and the backward's
// activation derivative, bias and residual gradients as ATen ops, with the results in exactly the
// layouts and dtypes bmkernels' own kernels return.
#include "cpu/conv_engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

#include "common/activations.h"

namespace bmk::cpu {
namespace {

enum class Engine { own, aten };

// bmkernels' kernel is chosen only when its median time is below this fraction of ATen's.
constexpr double kOwnMargin = 0.95;
// Timed calls per engine on a key's first call (after one untimed each), and more when the medians land
// within kRetimeBand of the margin (a shared machine's noise can flip a close call).
constexpr int kTimedRounds = 5;
constexpr int kRetimeRounds = 6;
constexpr double kRetimeBand = 0.05;

const char* engine_name(Engine e) { return e == Engine::own ? "bmkernels" : "aten"; }

// BMK_CONV_ENGINE, read per call (cheap) so that it can be switched at run time.
std::string requested_engine() {
  const char* env = std::getenv("BMK_CONV_ENGINE");
  const std::string name = env && *env ? env : "auto";
  TORCH_CHECK(name == "auto" || name == "bmkernels" || name == "aten",
              "bmkernels conv2d: BMK_CONV_ENGINE must be auto, bmkernels or aten; got '", name, "'");
  return name;
}

// A shape key: every number the engines' speed depends on (cheap to build on the hot path;
// key_text spells it out for conv_engine_choices).
using Key = std::vector<int64_t>;

std::mutex choices_mutex;
std::map<Key, Engine>& choices() {
  static std::map<Key, Engine> table;
  return table;
}

at::MemoryFormat format_of(const at::Tensor& t) {  // as csrc/cpu/conv.cpp decides the output's format
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// pass (0 forward, 1 backward), x (4), weight (4), stride (2), padding (4), dilation (2), groups, dtype,
// channels_last, activation, then the pass's flags.
Key key_of(int64_t pass, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation, int64_t groups, int64_t activation, std::initializer_list<int64_t> flags) {
  Key key{pass};
  key.reserve(26);
  for (at::IntArrayRef part : {x.sizes(), weight.sizes(), stride, padding, dilation}) {
    key.insert(key.end(), part.begin(), part.end());
  }
  key.insert(key.end(), {groups, static_cast<int64_t>(x.scalar_type()),
                         format_of(x) == at::MemoryFormat::ChannelsLast ? 1 : 0, activation});
  key.insert(key.end(), flags);
  return key;
}

std::string key_text(const Key& k) {
  const auto range = [&](size_t begin, size_t n) { return at::IntArrayRef(k.data() + begin, n); };
  std::ostringstream text;
  text << (k[0] == 0 ? "fwd" : "bwd") << " x" << range(1, 4) << " w" << range(5, 4) << " s" << range(9, 2) << " p"
       << range(11, 4) << " d" << range(15, 2) << " g" << k[17] << " " << static_cast<at::ScalarType>(k[18])
       << (k[19] ? " channels_last" : " nchw") << " act" << k[20];
  if (k[0] == 0) {
    text << (k[21] ? " bias" : "") << (k[22] ? " residual" : "") << (k[23] ? " preact" : "");
  } else {
    text << " mask" << k[21] << k[22] << k[23] << k[24] << (k[25] ? " from_output" : "");
  }
  return text.str();
}

template <typename F>
double seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Runs the engine chosen for `key`: the one BMK_CONV_ENGINE names, else the cached choice, else (first
// call of the key) both, interleaved: one untimed call each, then kTimedRounds timed (kRetimeRounds more
// when the call is close); bmkernels' kernel wins only if its median is clearly lower (kOwnMargin), and
// the winner's last result is returned.
template <typename Result, typename Own, typename Aten>
Result run_chosen(const Key& key, const Own& own, const Aten& aten, bool aten_by_rule) {
  const std::string requested = requested_engine();
  if (requested == "bmkernels") return own();
  if (requested == "aten") return aten();
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    const auto it = choices().find(key);
    if (it != choices().end()) return it->second == Engine::own ? own() : aten();
    if (aten_by_rule) choices()[key] = Engine::aten;
  }
  if (aten_by_rule) return aten();
  Result own_result, aten_result;
  std::vector<double> own_times, aten_times;
  const auto time_rounds = [&](int rounds) {
    for (int round = 0; round < rounds; ++round) {
      own_times.push_back(seconds([&] { own_result = own(); }));
      aten_times.push_back(seconds([&] { aten_result = aten(); }));
    }
  };
  // the untimed round warms both up (oneDNN primitive creation, brgemm code generation, cold caches)
  own_result = own();
  aten_result = aten();
  time_rounds(kTimedRounds);
  // medians, not minima: one lucky or preempted call on a shared machine does not decide
  double ratio = median(own_times) / median(aten_times);
  if (std::abs(ratio - kOwnMargin) < kRetimeBand) {
    time_rounds(kRetimeRounds);
    ratio = median(own_times) / median(aten_times);
  }
  // bmkernels' kernel must win clearly: a first-call timing is noisy, and ATen's convolution is what the
  // unswapped model runs, so choosing it can never make a layer slower than the original
  const Engine chosen = ratio < kOwnMargin ? Engine::own : Engine::aten;
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    choices()[key] = chosen;
  }
  return chosen == Engine::own ? own_result : aten_result;
}

// ATen's convolution takes symmetric padding; asymmetric padding (padding="same" with an even kernel)
// pads x explicitly. Returns (input, per-dim padding).
std::pair<at::Tensor, std::vector<int64_t>> aten_input(const at::Tensor& x, at::IntArrayRef padding) {
  if (padding[0] == padding[1] && padding[2] == padding[3]) return {x, {padding[0], padding[2]}};
  return {at::constant_pad_nd(x, {padding[2], padding[3], padding[0], padding[1]}), {0, 0}};
}

// act(z) in place where ATen has an in-place form (z is a fresh conv output).
at::Tensor activate(at::Tensor z, int64_t activation, double slope) {
  switch (activation) {
    case 1:
      return z.relu_();
    case 2:
      return at::leaky_relu_(z, slope);
    case 3:
      return at::gelu(z, "none");
    case 4:
      return at::gelu(z, "tanh");
    case 5:
      return at::silu_(z);
    case 6:
      return at::hardtanh_(z, 0, 6);
    case 7:
      return at::hardswish_(z);
    default:
      return z;
  }
}

// dL/dz from dL/dact and the saved output (saved_is_output) or pre-activation.
at::Tensor activation_grad(const at::Tensor& grad, const at::Tensor& saved, int64_t activation, double slope) {
  switch (activation) {
    case 1:  // grad at a NaN, as torch's relu (threshold_backward)
      return at::where(saved <= 0, at::zeros({}, grad.options()), grad);
    case 2:
      return at::where(saved > 0, grad, grad * slope);
    case 3:
      return at::gelu_backward(grad, saved, "none");
    case 4:
      return at::gelu_backward(grad, saved, "tanh");
    case 5:
      return at::silu_backward(grad, saved);
    case 6:
      return at::hardtanh_backward(grad, saved, 0, 6);
    case 7:
      return at::hardswish_backward(grad, saved);
    default:
      return grad;
  }
}

ConvFwdResult aten_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope, bool save_preact) {
  const auto [xin, pad] = aten_input(x, padding);
  const std::optional<at::Tensor> conv_bias = bias ? std::optional<at::Tensor>(bias->to(x.scalar_type())) : bias;
  at::Tensor z =
      at::convolution(xin, weight, conv_bias, stride, pad, dilation, false, {0, 0}, groups).contiguous(format_of(x));
  if (residual) z.add_(*residual);
  at::Tensor preact = save_preact ? z.clone() : at::empty({0}, x.options());
  return {activate(z, activation, slope), preact};
}

ConvBwdResult aten_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& act_saved, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                       std::array<bool, 4> output_mask) {
  const auto [need_dx, need_dw, need_db, need_dres] = output_mask;
  const at::MemoryFormat fmt = format_of(x);
  const auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor dz = activation_grad(grad_out, act_saved, activation, slope).contiguous(fmt);
  // dz is returned only as the residual gradient, and an operator's output must not alias its input
  if (need_dres && dz.is_same(grad_out)) dz = dz.clone();
  at::Tensor dx = none(), dw = none(), db = none();
  if (need_dx || need_dw) {
    const auto [xin, pad] = aten_input(x, padding);
    auto [dx_in, dw_out, unused] = at::convolution_backward(dz, xin, weight, std::nullopt, stride, pad, dilation, false,
                                                            {0, 0}, groups, {need_dx, need_dw, false});
    if (need_dx) {
      if (xin.sizes() != x.sizes()) dx_in = dx_in.narrow(2, padding[0], x.size(2)).narrow(3, padding[2], x.size(3));
      dx = dx_in.contiguous(fmt);
    }
    if (need_dw) dw = dw_out.contiguous(fmt);
  }
  if (need_db) {
    const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    db = dz.to(acc).sum({0, 2, 3}).to(weight.scalar_type());
  }
  return {dx, dw, db, need_dres ? dz : none()};
}

// A tensor argument the kernels read as x's dtype, on x's device.
void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bmkernels conv2d: ", name, " must have x's dtype ", x.scalar_type(),
              "; got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "bmkernels conv2d: ", name, " must be on x's device ", x.device(), "; got ",
              t.device());
}

// The output shape (N, Cout, Ho, Wo) after checking every argument either engine indexes by: stride,
// dilation and groups >= 1 (a 0 divides), padding >= 0, channels that match the groups, a known
// activation, dtypes. x with 0 channels gives torch's result: (N, 0, Ho, Wo).
std::vector<int64_t> checked_output_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                          int64_t activation) {
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
              "bmkernels conv2d: stride must be two ints >= 1; got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "bmkernels conv2d: dilation must be two ints >= 1; got ", dilation);
  TORCH_CHECK(padding.size() == 4 && *std::min_element(padding.begin(), padding.end()) >= 0,
              "bmkernels conv2d: padding must be four ints (top, bottom, left, right) >= 0; got ", padding);
  TORCH_CHECK(activation >= 0 && activation <= kLastActivation, "bmkernels conv2d: activation must be a code 0..",
              kLastActivation, " of bmk::Activation; got ", activation);
  TORCH_CHECK(groups >= 1, "bmkernels conv2d: groups must be >= 1; got ", groups);
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "bmkernels conv2d: x and weight must be 4-D; got x ", x.sizes(),
              ", weight ", weight.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "bmkernels conv2d: x must be float32, float64 or bfloat16; got ", dtype);
  check_like_x("weight", weight, x);
  TORCH_CHECK(x.size(1) % groups == 0 && weight.size(1) == x.size(1) / groups && weight.size(0) >= 1 &&
                  weight.size(0) % groups == 0,
              "bmkernels conv2d: x has ", x.size(1), " channels and weight ", weight.sizes(), " with groups = ", groups,
              "; expected input channels a multiple of groups, weight (Cout, Cin / groups, kh, kw) ",
              "and Cout >= 1 a multiple of groups");
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1, "bmkernels conv2d: the kernel must be at least 1x1; got ",
              "weight ", weight.sizes());
  const int64_t h = x.size(2) + padding[0] + padding[1] - dilation[0] * (weight.size(2) - 1) - 1;
  const int64_t w = x.size(3) + padding[2] + padding[3] - dilation[1] * (weight.size(3) - 1) - 1;
  TORCH_CHECK(h >= 0 && w >= 0, "bmkernels conv2d: the (padded) input ", x.sizes(), " is smaller than the ",
              "(dilated) kernel ", weight.sizes());
  return {x.size(0), x.size(1) == 0 ? 0 : weight.size(0), h / stride[0] + 1, w / stride[1] + 1};
}

// NCHW dense convs with a spatial kernel and >= 16 input channels (a ResNet's 3x3 layers) run ATen's
// convolution without timing: our kernel there pays an NCHW -> NHWC copy of x and a transposing store,
// which a first-call timing on cache-hot operands undercharges, and oneDNN's NCHW time is bimodal
// (1.5 / 3.3 ms on 4x512x4x4) so five medians can pick our kernel where it is 27% slower (ResNet-18
// training steps whose timing picked our kernel for such layers ran 0.95x eager, the others 0.99x).
bool aten_by_rule(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  return format_of(x) == at::MemoryFormat::Contiguous && groups == 1 && x.size(1) >= 16 &&
         weight.size(2) * weight.size(3) > 1;
}

// torch 2.14.1's CPU bfloat16 convolution (oneDNN) returns inf/NaN when the output is 1 wide with a
// stride > 1 along the width (tests/ops/test_conv_engine.py); such shapes (and their transpose) stay
// on our kernel whatever BMK_CONV_ENGINE says.
bool onednn_bfloat16_hazard(const at::Tensor& x, const std::vector<int64_t>& out_shape, at::IntArrayRef stride) {
  return x.scalar_type() == at::kBFloat16 &&
         ((out_shape[3] == 1 && stride[1] > 1) || (out_shape[2] == 1 && stride[0] > 1));
}

}  // namespace

ConvFwdResult conv2d_fwd_engine(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t activation,
                                double slope, bool save_preact, OwnConvFwd own_fwd) {
  const std::vector<int64_t> out_shape = checked_output_shape(x, weight, stride, padding, dilation, groups, activation);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "bmkernels conv2d: bias must have shape (Cout,) = (", weight.size(0), "); got ", bias->sizes());
  TORCH_CHECK(!residual || residual->sizes() == at::IntArrayRef(out_shape),
              "bmkernels conv2d: residual must have the output's shape ", at::IntArrayRef(out_shape), "; got ",
              residual->sizes());
  if (bias) check_like_x("bias", *bias, x);
  if (residual) check_like_x("residual", *residual, x);
  if (x.size(1) == 0) {  // torch's result: an empty (N, 0, Ho, Wo) map, bias unused
    at::Tensor out = at::empty(out_shape, x.options().memory_format(format_of(x)));
    return {out, save_preact ? at::empty_like(out) : at::empty({0}, x.options())};
  }
  const auto own = [&] {
    return own_fwd(x, weight, bias, residual, stride, padding, dilation, groups, activation, slope, save_preact);
  };
  const bool aten_applies = x.numel() > 0 && !onednn_bfloat16_hazard(x, out_shape, stride);
  if (!aten_applies || requested_engine() == "bmkernels") return own();
  const Key key = key_of(0, x, weight, stride, padding, dilation, groups, activation,
                         {bias.has_value(), residual.has_value(), save_preact});
  const auto aten = [&] {
    return aten_fwd(x, weight, bias, residual, stride, padding, dilation, groups, activation, slope, save_preact);
  };
  return run_chosen<ConvFwdResult>(key, own, aten, aten_by_rule(x, weight, groups));
}

ConvBwdResult conv2d_bwd_engine(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& act_saved, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                                bool saved_is_output, std::array<bool, 4> output_mask, OwnConvBwd own_bwd) {
  const std::vector<int64_t> out_shape = checked_output_shape(x, weight, stride, padding, dilation, groups, activation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "bmkernels conv2d backward: grad_out must have the ",
              "output's shape ", at::IntArrayRef(out_shape), "; got ", grad_out.sizes());
  TORCH_CHECK(activation == 0 || act_saved.sizes() == at::IntArrayRef(out_shape),
              "bmkernels conv2d backward: ", "act_saved must have the output's shape ", at::IntArrayRef(out_shape),
              "; got ", act_saved.sizes());
  check_like_x("grad_out", grad_out, x);
  if (activation != 0) check_like_x("act_saved", act_saved, x);
  if (x.size(1) == 0) {  // nothing reaches the (empty) output: zero gradients, as torch's
    const auto [need_dx, need_dw, need_db, need_dres] = output_mask;
    const auto none = [&] { return at::empty({0}, x.options()); };
    return {need_dx ? at::zeros_like(x) : none(),
            need_dw ? at::zeros(weight.sizes(), weight.options().memory_format(format_of(x))) : none(),
            need_db ? at::zeros({weight.size(0)}, weight.options()) : none(), need_dres ? grad_out.clone() : none()};
  }
  const auto own = [&] {
    return own_bwd(grad_out, x, weight, act_saved, stride, padding, dilation, groups, activation, slope,
                   saved_is_output, output_mask);
  };
  const bool aten_applies = x.numel() > 0 && grad_out.numel() > 0 && !onednn_bfloat16_hazard(x, out_shape, stride);
  if (!aten_applies || requested_engine() == "bmkernels") return own();
  const Key key = key_of(1, x, weight, stride, padding, dilation, groups, activation,
                         {output_mask[0], output_mask[1], output_mask[2], output_mask[3], saved_is_output});
  const auto aten = [&] {
    return aten_bwd(grad_out, x, weight, act_saved, stride, padding, dilation, groups, activation, slope, output_mask);
  };
  return run_chosen<ConvBwdResult>(key, own, aten, aten_by_rule(x, weight, groups));
}

std::vector<std::pair<std::string, std::string>> conv_engine_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [key, engine] : choices()) out.emplace_back(key_text(key), engine_name(engine));
  return out;
}

void clear_conv_engine_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex);
  choices().clear();
}

}  // namespace bmk::cpu
