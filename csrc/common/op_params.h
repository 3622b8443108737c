#pragma once
// An op's argument struct (its params), generated from ONE list of its schema arguments
// (csrc/registration.cpp), so that the CPU kernels, the autograd and other C++ callers pass the struct
// instead of repeating the argument list. (Named ...Args: the CUDA kernels' ...Params are their launch
// parameters, pointers and strides, which the CUDA glue fills from these.) The list is a macro LIST(X)
// of X(parameter type, name) in schema order; the parameter type is the unboxed kernel's
// (const at::Tensor&, const std::optional<at::Tensor>&, bool, double, int64_t), spelled without a
// top-level comma. BMK_OP_ARGS(Name, Result, LIST) defines struct Name with:
//   - the members, one per argument (decayed types: the struct holds the tensors);
//   - Signature, the schema's unboxed function type (for m.impl and typed<>; the dispatcher checks it
//     against the schema when the library loads);
//   - entry<fn>, a function of type Signature that builds the struct and returns fn(const Name&);
//   - fields(), the members as a tuple of references in schema order, kArity, their number, and
//     kNames, their names (tests/ops/test_op_tables.py checks them against the schema's).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstddef>
#include <optional>
#include <tuple>
#include <type_traits>

#define BMK_ARGS_DROP_FIRST_(first, ...) __VA_ARGS__
#define BMK_ARGS_DROP_FIRST(...) BMK_ARGS_DROP_FIRST_(__VA_ARGS__)
#define BMK_ARGS_MEMBER(type, name) std::decay_t<type> name;
#define BMK_ARGS_TYPE(type, name) , type
#define BMK_ARGS_DECL(type, name) , type name
#define BMK_ARGS_NAME(type, name) , name
#define BMK_ARGS_ONE(type, name) +1
#define BMK_ARGS_STRING(type, name) , #name

#define BMK_OP_ARGS(Name, Result, LIST)                                                                  \
  struct Name {                                                                                          \
    LIST(BMK_ARGS_MEMBER)                                                                                \
    using Signature = Result(BMK_ARGS_DROP_FIRST(LIST(BMK_ARGS_TYPE)));                                  \
    template <Result (*fn)(const Name&)>                                                                 \
    static Result entry(BMK_ARGS_DROP_FIRST(LIST(BMK_ARGS_DECL))) {                                      \
      return fn(Name{BMK_ARGS_DROP_FIRST(LIST(BMK_ARGS_NAME))});                                         \
    }                                                                                                    \
    auto fields() const { return std::forward_as_tuple(BMK_ARGS_DROP_FIRST(LIST(BMK_ARGS_NAME))); }      \
    auto fields() { return std::forward_as_tuple(BMK_ARGS_DROP_FIRST(LIST(BMK_ARGS_NAME))); }            \
    static constexpr std::size_t kArity = 0 LIST(BMK_ARGS_ONE);                                          \
    static constexpr std::array<const char*, kArity> kNames{BMK_ARGS_DROP_FIRST(LIST(BMK_ARGS_STRING))}; \
  };

namespace bmk {

// The typed handle of operator `name` (e.g. "bmkernels::gru_layer_fwd"), whose schema Args mirrors.
template <typename Args>
c10::TypedOperatorHandle<typename Args::Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<typename Args::Signature>();
}

// Calls the operator with the struct's arguments.
template <typename Args>
auto call_op(const c10::TypedOperatorHandle<typename Args::Signature>& op, const Args& args) {
  return std::apply([&](const auto&... a) { return op.call(a...); }, args.fields());
}

}  // namespace bmk
