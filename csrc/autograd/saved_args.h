#pragma once
// Autograd over an op's argument struct (csrc/common/op_params.h): a torch::autograd::Function whose
// forward takes the schema's arguments, and the saving of the whole struct for the backward, so that
// an argument added to the struct needs no code here.
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace bmk::autograd {

// Function::apply with the struct's arguments: autograd sees each tensor argument as an input.
template <typename Function, typename Args>
torch::autograd::variable_list apply_args(const Args& args) {
  return std::apply([](const auto&... a) { return Function::apply(a...); }, args.fields());
}

// ctx->needs_input_grad of the struct's tensor argument `member`; false where it is absent (autograd numbers
// the tensors given only).
template <typename Args, typename T>
bool needs_grad(torch::autograd::AutogradContext* ctx, const Args& args, T Args::* member) {
  const void* target = &(args.*member);
  int64_t index = 0;
  bool found = false, given = false;
  auto visit = [&](const auto& a) {
    using U = std::decay_t<decltype(a)>;
    bool input = false;
    if constexpr (std::is_same_v<U, at::Tensor>) input = true;
    if constexpr (std::is_same_v<U, std::optional<at::Tensor>>) input = a.has_value();
    if (found) return;
    if (static_cast<const void*>(&a) == target) {
      found = true;
      given = input;
    } else if (input) {
      ++index;
    }
  };
  std::apply([&](const auto&... a) { (visit(a), ...); }, args.fields());
  return given && ctx->needs_input_grad(index);
}

// Saves args (its tensors, absent optionals as undefined ones, then `outputs`, through
// save_for_backward; its other arguments in saved_data) for load_args.
template <typename Args>
void save_args(torch::autograd::AutogradContext* ctx, const Args& args, const std::vector<at::Tensor>& outputs) {
  std::vector<at::Tensor> tensors;
  std::vector<c10::IValue> others;
  auto save = [&](const auto& a) {
    using T = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<T, at::Tensor>) {
      tensors.push_back(a);
    } else if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
      tensors.push_back(a.value_or(at::Tensor()));
    } else {
      others.emplace_back(a);
    }
  };
  std::apply([&](const auto&... a) { (save(a), ...); }, args.fields());
  tensors.insert(tensors.end(), outputs.begin(), outputs.end());
  ctx->save_for_backward(tensors);
  ctx->saved_data["args"] = c10::ivalue::Tuple::create(std::move(others));
}

// The struct save_args saved, and the outputs saved with it.
template <typename Args>
std::pair<Args, std::vector<at::Tensor>> load_args(torch::autograd::AutogradContext* ctx) {
  std::vector<at::Tensor> tensors = ctx->get_saved_variables();
  const auto others = ctx->saved_data["args"].toTuple();
  Args args{};
  size_t tensor_index = 0, other_index = 0;
  auto load = [&](auto& a) {
    using T = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<T, at::Tensor>) {
      a = tensors[tensor_index++];
    } else if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
      const at::Tensor& t = tensors[tensor_index++];
      a = t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    } else {
      a = others->elements()[other_index++].template to<T>();
    }
  };
  std::apply([&](auto&... a) { (load(a), ...); }, args.fields());
  return {std::move(args), std::vector<at::Tensor>(tensors.begin() + tensor_index, tensors.end())};
}

}  // namespace bmk::autograd
