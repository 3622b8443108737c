// The bmkernels operator library: every op schema, defined once. Device kernels register their
// implementations with TORCH_LIBRARY_IMPL next to them (csrc/cpu/registration.cpp, csrc/cuda/).
// Also the bmkernels._C Python module, which loads this library and reports what was compiled.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "common/attention_params.h"
#include "common/batch_norm_params.h"
#include "common/gru_params.h"
#include "cpu/conv_engine.h"
#include "cpu/isa.h"
#include "cpu/scratch.h"

// setup.py passes the compiled ISAs and CUDA archs as bare comma lists (shell-safe); quote them here.
#define BMK_STRINGIFY_(...) #__VA_ARGS__
#define BMK_STRINGIFY(...) BMK_STRINGIFY_(__VA_ARGS__)
#ifdef BMK_CPU_ISAS
#define BMK_CPU_ISAS_STR BMK_STRINGIFY(BMK_CPU_ISAS)
#else
#define BMK_CPU_ISAS_STR ""
#endif
#ifdef BMK_CUDA_ARCHS
#define BMK_CUDA_ARCHS_STR BMK_STRINGIFY(BMK_CUDA_ARCHS)
#else
#define BMK_CUDA_ARCHS_STR ""
#endif

// The schemas that an op and its emulated CUDA twin share: arguments and results.
#define BMK_ATTENTION_FWD_SCHEMA                                                                        \
  "(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor? alibi_slopes, Tensor? rng_seed, " \
  "float scale, float softcap, int window_left, int window_right, int diag_offset, float dropout_p, "   \
  "Tensor? key_range=None, Tensor? segments=None, Tensor? sinks=None) -> (Tensor, Tensor)"
#define BMK_ATTENTION_BWD_SCHEMA                                                                             \
  "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, Tensor? bias, " \
  "Tensor? mask, Tensor? alibi_slopes, Tensor? rng_seed, float scale, float softcap, int window_left, "      \
  "int window_right, int diag_offset, float dropout_p, bool bias_grad, Tensor? key_range=None, "             \
  "Tensor? segments=None) -> (Tensor, Tensor, Tensor, Tensor)"
#define BMK_GRU_CELL_FWD_SCHEMA                                                                      \
  "(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool save_workspace) " \
  "-> (Tensor, Tensor)"
#define BMK_GRU_LAYER_FWD_SCHEMA                                                                  \
  "(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? lengths, " \
  "bool save_workspace) -> (Tensor, Tensor, Tensor)"
#define BMK_GRU_LAYER_BWD_SCHEMA                                                                        \
  "(Tensor grad_out, Tensor grad_h_n, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? lengths, " \
  "Tensor workspace, bool has_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY(bmkernels, m) {
  // Attention over (B, H, L, D) tensors; bias and mask broadcast to (B, Hq, Lq, Lk); window bounds
  // of -1 are unbounded (causal is window_right = 0); query i is aligned to key i + diag_offset;
  // rng_seed (int64, one element) seeds the Philox dropout mask; key_range (B, 2) int64 rows
  // [begin, end): batch b's keys outside it are padding (whole key blocks skipped); segments (S + 1, 2)
  // int64, cumulative (query, key) row offsets of packed sequences in batch 1 (FlashAttention's varlen):
  // each attends to its own keys, aligned bottom-right; sinks (Hq,) float, a logit per query head that
  // joins every row's softmax denominator with no value (gpt-oss). Returns out and lse (B, Hq, Lq).
  m.def("attention_fwd" BMK_ATTENTION_FWD_SCHEMA,
        // out takes q's layout (free transpose back to the projection layout): inductor must pass the
        // strides it traced.
        {at::Tag::needs_exact_strides});
  // Gradients of attention_fwd (grad_lse: optional gradient of lse); dbias is (B, Hq, Lq, Lk) when
  // bias_grad, else empty.
  m.def("attention_bwd" BMK_ATTENTION_BWD_SCHEMA);
  // The CUDA kernels run by the SIMT emulator on CPU tensors (builds with BMK_CUDA_EMULATOR=1; backend
  // "cuda_emulated"): the schemas of attention_fwd / attention_bwd.
  m.def("attention_emulated_fwd" BMK_ATTENTION_FWD_SCHEMA);
  m.def("attention_emulated_bwd" BMK_ATTENTION_BWD_SCHEMA);
  // The architecture layer's probe (csrc/cuda/arch_probe.cu): per-lane registers of ldmatrix, mma, shuffles
  // and cp.async on a 16 x 16 tile (f16 bits, or bf16 when bf16), on a GPU or in the emulator.
  m.def("arch_probe(Tensor tile, bool bf16) -> Tensor");
  // Two rounds of a shared-memory exchange, variant 0 (correct) .. 4 (a barrier missing): for the race detector.
  m.def("arch_race_demo(Tensor device_like, int variant) -> Tensor");
  // Attention of q (B, Lq, Hq, D) over a KV cache (FlashAttention's flash_attn_with_kvcache, forward only):
  // k_cache/v_cache (rows, L, Hkv, D) dense, batch b reading cache row cache_batch_idx[b] (else b), or pages
  // (blocks, block_size, Hkv, D) through block_table (B, max_blocks); batch b sees its first cache_seqlens[b]
  // keys, query i aligned bottom-right to key i + cache_seqlens[b] - Lq. Returns out (B, Lq, Hq, Dv) and
  // lse (B, Hq, Lq).
  m.def(
      "attention_kvcache_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
      "Tensor? cache_batch_idx, Tensor? alibi_slopes, float scale, float softcap, int window_left, "
      "int window_right) -> (Tensor, Tensor)");
  // The keep-mask (B, H, Lq, Lk) that attention_fwd's dropout draws for rng_seed: for tests and debugging.
  m.def(
      "attention_dropout_mask(Tensor rng_seed, int batch, int heads, int q_len, int k_len, float dropout_p) -> Tensor");

  // GRU (gate order r, z, n; b_hn inside the reset product, as torch.nn.GRU). One cell step: x (B, I),
  // h (B, H), w_ih (3H, I), w_hh (3H, H), biases (3H,). Returns h_next and, when save_workspace, the
  // (B, 5H) workspace that gru_layer_bwd reads (r, z, n, hn, h per row); else an empty one.
  m.def("gru_cell_fwd" BMK_GRU_CELL_FWD_SCHEMA);
  // One GRU layer over a sequence, D = 1 or 2 directions (the second runs backwards in time):
  // x (T, B, I), h0 (D, B, H), w_ih (D, 3H, I), w_hh (D, 3H, H), biases (D, 3H), lengths (B,) int64
  // (steps t >= lengths[b] keep the state and output 0). Returns out (T, B, D*H), h_n (D, B, H) and the
  // workspace (D, T, B, 5H) (empty unless save_workspace).
  m.def("gru_layer_fwd" BMK_GRU_LAYER_FWD_SCHEMA);
  // Gradients of gru_layer_fwd: dx, dh0, dw_ih, dw_hh, db_ih, db_hh (the bias gradients empty unless has_bias).
  m.def("gru_layer_bwd" BMK_GRU_LAYER_BWD_SCHEMA);

  // Fused conv2d over (N, C, H, W): act(conv(x, weight) + bias + residual); padding is (top, bottom,
  // left, right); activation is a code of bmk::Activation (csrc/common/activations.h) with slope for
  // leaky_relu. Returns out (in x's memory format) and, when save_preact, the pre-activation (else empty).
  m.def(
      "conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, int activation, float slope, bool save_preact) -> (Tensor, Tensor)");
  // Gradients of conv2d_fwd: act_saved is its output (saved_is_output) or pre-activation; output_mask
  // picks (dx, dweight, dbias, dresidual); gradients not asked for are empty.
  m.def(
      "conv2d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor act_saved, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, int activation, float slope, bool saved_is_output, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Training-mode BatchNorm over (N, H, W) of x (N, C, H, W) fused with what follows it in a CNN block:
  // out = act((x - mean) * invstd * weight + bias + residual). Returns out (in x's memory format), the
  // batch mean, invstd and biased variance (float; double for double x) and, when save_preact, the
  // pre-activation (else empty). The running statistics are the caller's (bmkernels/ops/batch_norm.py).
  m.def(
      "batch_norm_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, int activation, "
      "float slope, bool save_preact) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of batch_norm_act_fwd: act_saved is its output (saved_is_output) or pre-activation;
  // output_mask picks (dx, dweight, dbias, dresidual); gradients not asked for are empty.
  m.def(
      "batch_norm_act_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor act_saved, "
      "int activation, float slope, bool saved_is_output, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // The CUDA conv2d and GRU kernels run by the SIMT emulator on CPU tensors (BMK_CUDA_EMULATOR=1 builds;
  // backend "cuda_emulated"), the convolutions and GEMMs in ATen: the arguments and results of conv2d_fwd,
  // conv2d_bwd, gru_cell_fwd, gru_layer_fwd and gru_layer_bwd.
  m.def(
      "conv2d_emulated_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, int activation, float slope, bool save_preact) -> (Tensor, Tensor)");
  m.def(
      "conv2d_emulated_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor act_saved, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups, int activation, float slope, bool saved_is_output, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_cell_emulated_fwd" BMK_GRU_CELL_FWD_SCHEMA);
  m.def("gru_layer_emulated_fwd" BMK_GRU_LAYER_FWD_SCHEMA);
  m.def("gru_layer_emulated_bwd" BMK_GRU_LAYER_BWD_SCHEMA);
}

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef BMK_CUDA_EMULATED
  const bool emulated = true;
#else
  const bool emulated = false;
#endif
  return Py_BuildValue("{s:s,s:s,s:O}", "cpu_isas", BMK_CPU_ISAS_STR, "cuda_archs", BMK_CUDA_ARCHS_STR, "cuda_emulator",
                       emulated ? Py_True : Py_False);
}

PyObject* active_cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(bmk::cpu::isa_name(bmk::cpu::active_isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

at::Tensor unpack_tensor(PyObject* o, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), "gru_cell: ", name, " must be a tensor; got ", Py_TYPE(o)->tp_name);
  return THPVariable_Unpack(o);
}

// _C.gru_cell_step(x, h, w_ih, w_hh, b_ih, b_hh, save_workspace) -> h_next: the gru_cell_fwd operator
// (autograd included) called from C++, for bmkernels.gru_cell's eager hot path: the Python argument
// parsing of torch.ops is a sizeable share of a batch-1 step.
PyObject* gru_cell_step(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *x, *h, *w_ih, *w_hh, *b_ih, *b_hh;
  int save = 0;
  if (!PyArg_ParseTuple(args, "OOOOOOp", &x, &h, &w_ih, &w_hh, &b_ih, &b_hh, &save)) return nullptr;
  auto optional = [](PyObject* o, const char* name) {
    return o == Py_None ? std::optional<at::Tensor>() : std::optional<at::Tensor>(unpack_tensor(o, name));
  };
  static const auto op = bmk::typed_op<bmk::GruCellFwdArgs>("bmkernels::gru_cell_fwd");
  auto result = bmk::call_op(
      op, bmk::GruCellFwdArgs{unpack_tensor(x, "x"), unpack_tensor(h, "h"), unpack_tensor(w_ih, "w_ih"),
                              unpack_tensor(w_hh, "w_hh"), optional(b_ih, "b_ih"), optional(b_hh, "b_hh"), save != 0});
  return THPVariable_Wrap(std::get<0>(std::move(result)));
  END_HANDLE_TH_ERRORS
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(bmk::cpu::cached_bytes()); }

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  bmk::cpu::release_cached_blocks();
  Py_RETURN_NONE;
}

PyObject* conv_engine_choices(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (const auto& [key, engine] : bmk::cpu::conv_engine_choices()) {
    PyObject* value = PyUnicode_FromString(engine.c_str());
    PyDict_SetItemString(out, key.c_str(), value);
    Py_DECREF(value);
  }
  return out;
}

PyObject* clear_conv_engine_choices(PyObject*, PyObject*) {
  bmk::cpu::clear_conv_engine_choices();
  Py_RETURN_NONE;
}

// _C.op_arg_names() -> {op: (argument names)}: each argument struct's names in order (csrc/common/op_params.h).
PyObject* op_arg_names(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  auto add = [&](const char* op, const auto& names) {
    PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
    for (size_t i = 0; i < names.size(); ++i) PyTuple_SET_ITEM(tuple, i, PyUnicode_FromString(names[i]));
    PyDict_SetItemString(out, op, tuple);
    Py_DECREF(tuple);
  };
  add("attention_fwd", bmk::AttentionFwdArgs::kNames);
  add("attention_bwd", bmk::AttentionBwdArgs::kNames);
  add("attention_emulated_fwd", bmk::AttentionFwdArgs::kNames);
  add("attention_emulated_bwd", bmk::AttentionBwdArgs::kNames);
  add("attention_kvcache_fwd", bmk::AttentionKvcacheFwdArgs::kNames);
  add("attention_dropout_mask", bmk::AttentionDropoutMaskArgs::kNames);
  add("gru_cell_fwd", bmk::GruCellFwdArgs::kNames);
  add("gru_layer_fwd", bmk::GruLayerFwdArgs::kNames);
  add("gru_layer_bwd", bmk::GruLayerBwdArgs::kNames);
  add("gru_cell_emulated_fwd", bmk::GruCellFwdArgs::kNames);
  add("gru_layer_emulated_fwd", bmk::GruLayerFwdArgs::kNames);
  add("gru_layer_emulated_bwd", bmk::GruLayerBwdArgs::kNames);
  add("batch_norm_act_fwd", bmk::BatchNormActFwdArgs::kNames);
  add("batch_norm_act_bwd", bmk::BatchNormActBwdArgs::kNames);
  return out;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this extension was compiled with."},
    {"active_cpu_isa", active_cpu_isa, METH_NOARGS, "The CPU instruction set the kernels run with now."},
    {"gru_cell_step", gru_cell_step, METH_VARARGS, "gru_cell_fwd's h_next, called without torch.ops' parsing."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "Bytes held in freed blocks of the CPU buffer pool."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Frees the blocks the CPU buffer pool holds."},
    {"conv_engine_choices", conv_engine_choices, METH_NOARGS, "The conv2d engine chosen per shape key."},
    {"clear_conv_engine_choices", clear_conv_engine_choices, METH_NOARGS, "Forgets the conv2d engine choices."},
    {"op_arg_names", op_arg_names, METH_NOARGS, "The argument names of each op's C++ argument struct."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "bmkernels compiled kernels", -1, methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
