// Fused CPU conv2d: convolution + bias + residual + activation, forward and backward
// (specification: bmkernels/reference/conv.py).
//
// Forward (implicit GEMM): per (group, tile of output pixels, range of output channels) a thread
// packs the tile's im2col rows from the NHWC input into a thread-local buffer (K in chunks, so it
// stays in L2) and multiplies them with the weights, packed once per call as [K x Cout] with
// K = (kh, kw, ci), through tile_gemm (torch's brgemm). With many input channels and long output rows
// there is no im2col: per output row each tap is one GEMM straight on the input (forward_direct); a
// pointwise conv's im2col rows are the input itself. Bias, residual and activation are applied to the
// accumulator tile while it is in cache, and the tile is stored once, in the output's memory format.
// Pixel tiles and channel ranges are both parallel, so small batches keep every core busy. Depthwise
// convolutions (one input and one output channel per group) use a direct loop, vectorized over channels.
//
// Backward: one pass over grad_output applies the activation's derivative (read off the output for
// relu / leaky_relu, else off the saved pre-activation) and yields dZ, the bias gradient and the
// residual gradient. The weight gradient is the GEMM dZ^T (Cout x pixels) . im2col (pixels x K),
// parallel over pixel ranges with per-thread partial sums (for long rows without im2col,
// weight_grad_rows), or over (Cout, K) blocks when the partials would move more memory than rereading
// x and dZ per block. The input gradient is one stride-1 conv of dZ per phase of the input pixels
// (S_h x S_w phases; one for stride 1), each storing into its own pixels (input_grad_by_phases); with
// few input channels per group, per tap the GEMM W_tap^T . dZ followed by a scatter-add (col2im),
// parallel over (image, input channels). NCHW tiles and copies move by 16x16 vector transposes.
// Compiled once per ISA (setup.py), inside namespace bmk::cpu::CPU_CAPABILITY.
#include "cpu/conv.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "common/activations.h"
#include "cpu/gemm.h"
#include "cpu/scratch.h"

namespace bmk::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kPixelTile = 128;         // forward: most output pixels per tile (GEMM M)
constexpr int64_t kChannelTile = 64;        // forward: output channels per tile_gemm call (GEMM N)
constexpr int64_t kDepthChunk = 512;        // forward: most im2col columns packed at a time (GEMM K)
constexpr int64_t kDirectMinChannels = 32;  // forward without im2col: least input channels per group (GEMM K)
constexpr int64_t kDirectMinWidth = 28;     // forward without im2col: least output row width (GEMM M)
constexpr int64_t kWgradPixels = 128;       // weight gradient: pixels per packed im2col block
constexpr int64_t kWgradDepth = 256;        // weight gradient: largest K block per work item
constexpr int64_t kWgradChannels = 256;     // weight gradient: largest Cout block per work item
constexpr int64_t kDgradPixels = 128;       // input gradient, scatter path: output pixels per tile
constexpr int64_t kPhaseMinChannels = 16;   // input gradient by phases: least input channels per group (GEMM N)
constexpr int64_t kDepthwisePixels = 16;    // depthwise: output pixels per tile
constexpr int64_t kPassPixels = 64;         // grad_output pass: pixels per block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A leading dimension of at least n floats that is not a multiple of 256 (1 KiB): rows of a tile then
// spread over the cache sets instead of aliasing into a few.
int64_t padded_ld(int64_t n) {
  n = ceil_div(n, 16) * 16;
  return n % 256 == 0 ? n + 16 : n;
}

struct ConvGeometry {
  int64_t batch, in_c, in_h, in_w, out_c, out_h, out_w, k_h, k_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;

  int64_t in_cg() const { return in_c / groups; }
  int64_t out_cg() const { return out_c / groups; }
  int64_t taps() const { return k_h * k_w; }
  int64_t gemm_k() const { return taps() * in_cg(); }
  int64_t out_hw() const { return out_h * out_w; }
  int64_t pixels() const { return batch * out_hw(); }
  bool depthwise() const { return in_cg() == 1 && out_cg() == 1; }
};

ConvGeometry geometry_of(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "conv2d: x and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2,
              "conv2d: stride and dilation need 2 values, padding 4 (top, bottom, left, right)");
  ConvGeometry g{};
  g.batch = x.size(0), g.in_c = x.size(1), g.in_h = x.size(2), g.in_w = x.size(3);
  g.out_c = weight.size(0), g.k_h = weight.size(2), g.k_w = weight.size(3);
  g.stride_h = stride[0], g.stride_w = stride[1], g.dil_h = dilation[0], g.dil_w = dilation[1];
  g.pad_h = padding[0], g.pad_w = padding[2], g.groups = groups;
  TORCH_CHECK(groups > 0 && g.in_c % groups == 0 && g.out_c % groups == 0 && weight.size(1) * groups == g.in_c,
              "conv2d: channels do not match groups");
  g.out_h = (g.in_h + padding[0] + padding[1] - g.dil_h * (g.k_h - 1) - 1) / g.stride_h + 1;
  g.out_w = (g.in_w + padding[2] + padding[3] - g.dil_w * (g.k_w - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "conv2d: output size must be positive");
  return g;
}

// Where pixel p (image-major, then row, then column; images hw pixels, rows width pixels) and channel c
// of a 4-D tensor live: offset(p) + c * channel_stride. Dense NCHW or NHWC tensors have row_stride =
// width * pixel_stride; a strided one describes every S-th row and column (an input-gradient phase).
struct PixelLayout {
  int64_t hw, width, image_stride, row_stride, pixel_stride, channel_stride;
  int64_t offset(int64_t p) const {
    return (p / hw) * image_stride + ((p % hw) / width) * row_stride + (p % width) * pixel_stride;
  }
};

at::MemoryFormat format_of(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

PixelLayout layout_of(int64_t channels, int64_t h, int64_t w, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::ChannelsLast) return {h * w, w, h * w * channels, w * channels, channels, 1};
  return {h * w, w, h * w * channels, w, 1, h * w};
}

// t itself when it is contiguous in NCHW or NHWC (keeping that format), else an NCHW copy.
at::Tensor dense(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

// dst = src, both 4-D of one shape. Between a float NCHW and a float NHWC tensor with at least 16 channels,
// by 16x16 vector transposes parallel over (image, block of pixels): about twice as fast here as the
// generic strided copy.
void copy_between_layouts(const at::Tensor& src, at::Tensor& dst) {
  constexpr int64_t kBlock = 256;  // pixels per work item
  const auto nchw = [](const at::Tensor& t) {
    return t.is_contiguous() && !t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  const auto nhwc = [](const at::Tensor& t) { return t.is_contiguous(at::MemoryFormat::ChannelsLast); };
  const int64_t C = src.size(1), HW = src.size(2) * src.size(3);
  const bool to_nhwc = nchw(src) && nhwc(dst), to_nchw = nhwc(src) && nchw(dst);
  if (!(to_nhwc || to_nchw) || src.scalar_type() != at::kFloat || dst.scalar_type() != at::kFloat || C < 16) {
    dst.copy_(src);
    return;
  }
  const float* from = src.const_data_ptr<float>();
  float* to = dst.data_ptr<float>();
  const int64_t blocks = ceil_div(HW, kBlock);
  at::parallel_for(0, src.size(0) * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, q0 = (item % blocks) * kBlock, q = std::min(kBlock, HW - q0);
      const int64_t planar = n * C * HW + q0, interleaved = (n * HW + q0) * C;  // pixel q0 of image n
      if (to_nhwc) {
        at::vec::transpose_mxn<float>(from + planar, HW, to + interleaved, C, C, q);
      } else {
        at::vec::transpose_mxn<float>(from + interleaved, C, to + planar, HW, q, C);
      }
    }
  });
}

// t (4-D) in NHWC: t itself when it is so already.
at::Tensor channels_last(const at::Tensor& t) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  at::Tensor out = at::empty_like(t, at::MemoryFormat::ChannelsLast);
  copy_between_layouts(t, out);
  return out;
}

// One tile [rows x n] (row m = pixel p0 + m, column c = channel c0 + c) between a dense buffer with
// leading dimension ld and a tensor with `layout`. Walks the tensor's contiguous direction inner.
template <typename T, typename Fn>
void for_tile(const PixelLayout& layout, int64_t p0, int64_t rows, int64_t c0, int64_t n, int64_t ld, int64_t* offsets,
              Fn&& fn) {
  for (int64_t m = 0; m < rows; ++m) offsets[m] = layout.offset(p0 + m) + c0 * layout.channel_stride;
  const int64_t cs = layout.channel_stride;
  if (cs == 1) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t c = 0; c < n; ++c) fn(m * ld + c, offsets[m] + c);
  } else {
    for (int64_t c = 0; c < n; ++c)
      for (int64_t m = 0; m < rows; ++m) fn(m * ld + c, offsets[m] + c * cs);
  }
}

// Runs of consecutive tile rows whose pixels are adjacent in a channel-strided (NCHW) tensor: fn(m0, len).
template <typename Fn>
void for_pixel_runs(const int64_t* offsets, int64_t rows, Fn&& fn) {
  for (int64_t m0 = 0, m = 1; m <= rows; ++m)
    if (m == rows || offsets[m] != offsets[m - 1] + 1) fn(m0, m - m0), m0 = m;
}

// tile[m * ld + c] = src at (pixel p0 + m, channel c0 + c); a channel-strided tensor of the tile's own type
// is read by 16x16 vector transposes, per run of adjacent pixels.
template <typename scalar_t, typename acc_t>
void load_tile(const PixelLayout& layout, const scalar_t* src, int64_t p0, int64_t rows, int64_t c0, int64_t n,
               acc_t* tile, int64_t ld, int64_t* offsets) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (layout.channel_stride != 1) {
      for (int64_t m = 0; m < rows; ++m) offsets[m] = layout.offset(p0 + m) + c0 * layout.channel_stride;
      for_pixel_runs(offsets, rows, [&](int64_t m0, int64_t len) {
        at::vec::transpose_mxn<acc_t>(src + offsets[m0], layout.channel_stride, tile + m0 * ld, ld, n, len);
      });
      return;
    }
  }
  for_tile<acc_t>(layout, p0, rows, c0, n, ld, offsets,
                  [&](int64_t i, int64_t o) { tile[i] = static_cast<acc_t>(src[o]); });
}

// The inverse of load_tile: dst at (pixel p0 + m, channel c0 + c) = tile[m * ld + c].
template <typename scalar_t, typename acc_t>
void store_tile(const PixelLayout& layout, scalar_t* dst, int64_t p0, int64_t rows, int64_t c0, int64_t n,
                const acc_t* tile, int64_t ld, int64_t* offsets) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (layout.channel_stride != 1) {
      for (int64_t m = 0; m < rows; ++m) offsets[m] = layout.offset(p0 + m) + c0 * layout.channel_stride;
      for_pixel_runs(offsets, rows, [&](int64_t m0, int64_t len) {
        at::vec::transpose_mxn<acc_t>(tile + m0 * ld, ld, dst + offsets[m0], layout.channel_stride, len, n);
      });
      return;
    }
  }
  for_tile<acc_t>(layout, p0, rows, c0, n, ld, offsets,
                  [&](int64_t i, int64_t o) { dst[o] = static_cast<scalar_t>(tile[i]); });
}

template <typename acc_t>
void activate(Activation act, acc_t slope, acc_t* v, int64_t n) {
  // one loop per activation, so the simple ones vectorize
  switch (act) {
    case Activation::none:
      return;
    case Activation::relu:
      for (int64_t i = 0; i < n; ++i) v[i] = activation_forward(Activation::relu, v[i], slope);
      return;
    case Activation::leaky_relu:
      for (int64_t i = 0; i < n; ++i) v[i] = activation_forward(Activation::leaky_relu, v[i], slope);
      return;
    case Activation::relu6:
      for (int64_t i = 0; i < n; ++i) v[i] = activation_forward(Activation::relu6, v[i], slope);
      return;
    case Activation::hardswish:
      for (int64_t i = 0; i < n; ++i) v[i] = activation_forward(Activation::hardswish, v[i], slope);
      return;
    default:
      for (int64_t i = 0; i < n; ++i) v[i] = activation_forward(act, v[i], slope);
  }
}

// Everything the forward epilogue needs: out = act(tile + bias + residual), pre-activation saved
// when asked. All tensors share out_layout.
template <typename scalar_t, typename acc_t>
struct Epilogue {
  const acc_t* bias;         // [Cout] or null
  const scalar_t* residual;  // or null
  scalar_t* out;
  scalar_t* preact;  // or null
  PixelLayout out_layout;
  Activation act;
  acc_t slope;

  // Applies to tile [rows x n] (leading dimension ld) of pixels p0.., channels c0..; offsets: rows slots.
  void apply(acc_t* tile, int64_t rows, int64_t n, int64_t ld, int64_t p0, int64_t c0, int64_t* offsets) const {
    if (bias != nullptr)
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t c = 0; c < n; ++c) tile[m * ld + c] += bias[c0 + c];
    if (residual != nullptr)
      for_tile<acc_t>(out_layout, p0, rows, c0, n, ld, offsets,
                      [&](int64_t i, int64_t o) { tile[i] += static_cast<acc_t>(residual[o]); });
    if (preact != nullptr) store_tile(out_layout, preact, p0, rows, c0, n, tile, ld, offsets);
    for (int64_t m = 0; m < rows; ++m) activate(act, slope, tile + m * ld, n);
    store_tile(out_layout, out, p0, rows, c0, n, tile, ld, offsets);
  }
};

template <typename src_t, typename dst_t>
void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// n values of the input at src in the accumulation type: src itself when the types agree, else converted
// into scratch.
template <typename scalar_t, typename acc_t>
const acc_t* input_row(const scalar_t* src, acc_t* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    convert_row(src, scratch, n);
    return scratch;
  }
}

// im2col rows of pixels p0 .. p0 + rows of one group, columns k0 .. k1 (k = (tap, ci)), from the
// NHWC input: a[m * ld + k - k0]; zeros where a tap falls in the padding.
template <typename in_t, typename acc_t>
void pack_im2col(const ConvGeometry& g, const in_t* x, int64_t group, int64_t p0, int64_t rows, int64_t k0, int64_t k1,
                 acc_t* a, int64_t ld) {
  const int64_t cg = g.in_cg();
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t p = p0 + m, n = p / g.out_hw(), oh = (p % g.out_hw()) / g.out_w, ow = p % g.out_w;
    acc_t* dst = a + m * ld;
    for (int64_t k = k0; k < k1;) {
      const int64_t tap = k / cg, ci = k % cg;
      const int64_t ih = oh * g.stride_h - g.pad_h + (tap / g.k_w) * g.dil_h;
      const int64_t iw = ow * g.stride_w - g.pad_w + (tap % g.k_w) * g.dil_w;
      int64_t len = std::min(cg - ci, k1 - k);
      // a whole kernel row inside the image is one contiguous run of NHWC input (all channels, unit dilation)
      if (cg == g.in_c && g.dil_w == 1 && ci == 0 && tap % g.k_w == 0 && k + g.k_w * cg <= k1 && iw >= 0 &&
          iw + g.k_w <= g.in_w)
        len = g.k_w * cg;
      if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
        convert_row(x + ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + group * cg + ci, dst, len);
      } else {
        std::fill(dst, dst + len, acc_t(0));
      }
      dst += len;
      k += len;
    }
  }
}

// A 1x1 conv with stride 1 and no padding: its im2col rows are the NHWC input's pixels themselves.
bool pointwise(const ConvGeometry& g) {
  return g.k_h == 1 && g.k_w == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0 &&
         g.in_h == g.out_h && g.in_w == g.out_w;
}

// im2col rows p0 .. p0 + rows, columns k0 .. k1 of one group as a GEMM operand {pointer, leading dimension}:
// the NHWC input itself for a pointwise conv in the accumulation type, else packed into buf (pack_im2col).
template <typename in_t, typename acc_t>
std::pair<const acc_t*, int64_t> im2col_operand(const ConvGeometry& g, const in_t* x, int64_t group, int64_t p0,
                                                int64_t rows, int64_t k0, int64_t k1, acc_t* buf, int64_t ld) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (pointwise(g)) return {x + p0 * g.in_c + group * g.in_cg() + k0, g.in_c};
  }
  pack_im2col(g, x, group, p0, rows, k0, k1, buf, ld);
  return {buf, ld};
}

// Whether forward_direct runs this conv: enough channels per tap for a GEMM of depth C_in, and output
// rows long enough to be the GEMM's M.
bool direct_applies(const ConvGeometry& g) {
  return g.in_cg() >= kDirectMinChannels && g.out_w >= kDirectMinWidth && !g.depthwise() && !pointwise(g);
}

// Per kernel column kw, the output columns [m_lo, m_hi) whose input column m * stride - pad + kw * dil lies in
// [0, in_w): the pixels of an output row for which that tap reads the image, not the padding.
std::vector<std::pair<int64_t, int64_t>> tap_columns(const ConvGeometry& g) {
  std::vector<std::pair<int64_t, int64_t>> columns(g.k_w);
  for (int64_t kw = 0; kw < g.k_w; ++kw) {
    const int64_t shift = kw * g.dil_w - g.pad_w;
    const int64_t m_lo = std::max<int64_t>(0, ceil_div(std::max<int64_t>(0, -shift), g.stride_w));
    const int64_t m_hi = std::min(g.out_w, g.in_w - 1 - shift < 0 ? 0 : (g.in_w - 1 - shift) / g.stride_w + 1);
    columns[kw] = {m_lo, m_hi};
  }
  return columns;
}

// Forward without im2col: for one output row of one image, the A operand of tap (kh, kw) is the NHWC input
// itself (pixel rows stride_w * C_in apart, C_in wide), so each tap is one tile_gemm over the row's pixels
// whose tap lands inside the image, accumulated in the row's C tile; the epilogue then runs on the tile.
// x: NHWC in the accumulation type; wp: as forward_gemm.
template <typename scalar_t, typename acc_t>
void forward_direct(const ConvGeometry& g, const acc_t* x, const acc_t* wp, const Epilogue<scalar_t, acc_t>& ep) {
  const int64_t K = g.gemm_k(), cg = g.in_cg(), cout_g = g.out_cg(), rows_total = g.batch * g.out_h;
  const int64_t channel_tiles = ceil_div(cout_g, kChannelTile);
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), rows_total * g.groups), 1, channel_tiles);
  const int64_t split_width = ceil_div(channel_tiles, splits) * kChannelTile;
  const int64_t ldc = padded_ld(std::min(split_width, cout_g));
  // the taps start at the first that covers the whole row, so the tile needs no zeroing
  const auto columns = tap_columns(g);
  int64_t first_kw = 0;
  for (int64_t kw = g.k_w - 1; kw >= 0; --kw)
    if (columns[kw].first == 0 && columns[kw].second == g.out_w) first_kw = kw;
  at::parallel_for(0, g.groups * rows_total * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> c(g.out_w * ldc);
    std::vector<int64_t> offsets(g.out_w);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / (rows_total * splits), row = (item / splits) % rows_total;
      const int64_t c0 = (item % splits) * split_width, c1 = std::min(cout_g, c0 + split_width);
      if (c0 >= c1) continue;
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const auto zero_tile = [&] {
        for (int64_t m = 0; m < g.out_w; ++m) std::fill(c.data() + m * ldc, c.data() + m * ldc + (c1 - c0), acc_t(0));
      };
      bool fresh = true;  // the tile holds nothing yet: a tap covering the whole row stores instead of adding
      for (int64_t kh = 0; kh < g.k_h; ++kh) {
        const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
        if (ih < 0 || ih >= g.in_h) continue;  // the whole kernel row falls in the padding
        for (int64_t j = 0; j < g.k_w; ++j) {
          const int64_t kw = (j + first_kw) % g.k_w;
          const auto [m_lo, m_hi] = columns[kw];
          if (m_lo >= m_hi) continue;
          if (fresh && (m_lo > 0 || m_hi < g.out_w)) zero_tile();
          const acc_t* a =
              x + ((n * g.in_h + ih) * g.in_w + m_lo * g.stride_w + kw * g.dil_w - g.pad_w) * g.in_c + group * cg;
          const int64_t k0 = (kh * g.k_w + kw) * cg;
          for (int64_t n0 = c0; n0 < c1; n0 += kChannelTile) {
            const acc_t* b = wp + ((group * channel_tiles + n0 / kChannelTile) * K + k0) * kChannelTile;
            tile_gemm<acc_t>(m_hi - m_lo, std::min(kChannelTile, c1 - n0), cg, a, g.stride_w * g.in_c, b, kChannelTile,
                             c.data() + m_lo * ldc + (n0 - c0), ldc, !fresh);
          }
          fresh = false;
        }
      }
      if (fresh) zero_tile();  // every tap falls in the padding
      ep.apply(c.data(), g.out_w, c1 - c0, ldc, row * g.out_w, group * cout_g + c0, offsets.data());
    }
    tile_gemm_done();
  });
}

// Forward through implicit GEMM; x: NHWC; wp: packed weights [G][channel tiles][K][kChannelTile].
// allow_direct: forward_direct may run (it skips the taps that read the padding: no 0 * w products).
template <typename in_t, typename scalar_t, typename acc_t>
void forward_gemm(const ConvGeometry& g, const in_t* x, const acc_t* wp, const Epilogue<scalar_t, acc_t>& ep,
                  bool allow_direct = true) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (allow_direct && direct_applies(g)) return forward_direct(g, x, wp, ep);
  }
  const int64_t P = g.pixels(), K = g.gemm_k(), cout_g = g.out_cg(), threads = at::get_num_threads();
  const int64_t channel_tiles = ceil_div(cout_g, kChannelTile);
  int64_t pixel_tiles = ceil_div(P, kPixelTile);
  // split the channels only as far as needed to give every thread a few work items
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * threads, pixel_tiles * g.groups), 1, channel_tiles);
  // equal tiles, in a number the threads share evenly where that takes a few more: with few work items, one
  // left over (or a short last tile) keeps the other threads waiting at the end
  for (int64_t extra = 0; extra < threads && (g.groups * pixel_tiles * splits) % threads != 0; ++extra) ++pixel_tiles;
  pixel_tiles = std::min(pixel_tiles, P);
  const int64_t tile_rows = ceil_div(P, pixel_tiles);
  const int64_t split_width = ceil_div(channel_tiles, splits) * kChannelTile;
  // K in equal chunks of at most kDepthChunk (no short tail chunk)
  const int64_t depth = std::min(K, ceil_div(ceil_div(K, ceil_div(K, kDepthChunk)), 16) * 16), lda = padded_ld(depth);
  const int64_t ldc = padded_ld(std::min(split_width, cout_g));
  at::parallel_for(0, g.groups * pixel_tiles * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(tile_rows * lda), c(tile_rows * ldc);
    std::vector<int64_t> offsets(tile_rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / (pixel_tiles * splits), tile = (item / splits) % pixel_tiles;
      const int64_t c0 = (item % splits) * split_width, c1 = std::min(cout_g, c0 + split_width);
      const int64_t p0 = tile * tile_rows, rows = std::min(tile_rows, P - p0);
      if (c0 >= c1 || rows <= 0) continue;
      if (K == 0) std::fill(c.begin(), c.end(), acc_t(0));
      for (int64_t k0 = 0; k0 < K; k0 += depth) {
        const int64_t kc = std::min(depth, K - k0);
        const auto [a_tile, a_ld] = im2col_operand(g, x, group, p0, rows, k0, k0 + kc, a.data(), lda);
        for (int64_t n0 = c0; n0 < c1; n0 += kChannelTile) {
          const acc_t* b = wp + ((group * channel_tiles + n0 / kChannelTile) * K + k0) * kChannelTile;
          tile_gemm<acc_t>(rows, std::min(kChannelTile, c1 - n0), kc, a_tile, a_ld, b, kChannelTile,
                           c.data() + (n0 - c0), ldc, k0 > 0);
        }
      }
      ep.apply(c.data(), rows, c1 - c0, ldc, p0, group * cout_g + c0, offsets.data());
    }
    tile_gemm_done();
  });
}

// Calls fn(tap, pixel) for every kernel tap of output pixel p that lands inside the image: tap =
// kh * k_w + kw, pixel = (n * in_h + ih) * in_w + iw, the input pixel it reads (NHWC offset / channels).
template <typename Fn>
void for_each_tap(const ConvGeometry& g, int64_t p, const Fn& fn) {
  const int64_t n = p / g.out_hw(), oh = (p % g.out_hw()) / g.out_w, ow = p % g.out_w;
  for (int64_t r = 0; r < g.k_h; ++r) {
    const int64_t ih = oh * g.stride_h - g.pad_h + r * g.dil_h;
    if (ih < 0 || ih >= g.in_h) continue;
    for (int64_t s = 0; s < g.k_w; ++s) {
      const int64_t iw = ow * g.stride_w - g.pad_w + s * g.dil_w;
      if (iw >= 0 && iw < g.in_w) fn(r * g.k_w + s, (n * g.in_h + ih) * g.in_w + iw);
    }
  }
}

// Depthwise forward, direct: x NHWC, wp [taps][C].
template <typename scalar_t, typename acc_t>
void forward_depthwise(const ConvGeometry& g, const scalar_t* x, const acc_t* wp, const Epilogue<scalar_t, acc_t>& ep) {
  const int64_t P = g.pixels(), C = g.out_c;
  at::parallel_for(0, ceil_div(P, kDepthwisePixels), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(kDepthwisePixels * C), x_row(C);
    std::vector<int64_t> offsets(kDepthwisePixels);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kDepthwisePixels, rows = std::min(kDepthwisePixels, P - p0);
      for (int64_t m = 0; m < rows; ++m) {
        acc_t* acc = tile.data() + m * C;
        std::fill(acc, acc + C, acc_t(0));
        for_each_tap(g, p0 + m, [&](int64_t tap, int64_t pixel) {
          const acc_t* xr = input_row(x + pixel * C, x_row.data(), C);
          const acc_t* w = wp + tap * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += xr[c] * w[c];
        });
      }
      ep.apply(tile.data(), rows, C, C, p0, 0, offsets.data());
    }
  });
}

// Whether v is inf or NaN: its exponent bits all set (integer operations, so loops over it vectorize).
template <typename T>
bool is_non_finite(T v) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits exponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  return (std::bit_cast<Bits>(v) & exponent) == exponent;
}

// A conv weight as pack_weight reads it: element (group, out, in, r, s) of a kernel of k_h x k_w taps at
// data + group * group_stride + out * out_stride + in * in_stride + r * r_stride + s * s_stride. A view of
// the same memory can select every other tap, swap out and in, or flip the taps (negative strides), which
// torch tensors cannot, so the input gradient's transposed and flipped kernels need no copy.
template <typename scalar_t>
struct WeightView {
  const scalar_t* data;
  int64_t groups, outs, ins, k_h, k_w;  // outs, ins: per group
  int64_t group_stride, out_stride, in_stride, r_stride, s_stride;
};

// The weight [Cout, Cin / groups, kH, kW] of a conv with `groups` groups.
template <typename scalar_t>
WeightView<scalar_t> view_of(const at::Tensor& w, int64_t groups) {
  const auto st = w.strides();
  return {w.const_data_ptr<scalar_t>(),
          groups,
          w.size(0) / groups,
          w.size(1),
          w.size(2),
          w.size(3),
          w.size(0) / groups * st[0],
          st[0],
          st[1],
          st[2],
          st[3]};
}

// Weights as GEMM operands, in one pass: wp[((group * tiles + co / width) * K + k) * width + co % width],
// k = (kh, kw, ci), tiles = ceil(outs / width); zero columns pad the last tile. The forward uses
// width = kChannelTile (each tile_gemm reads one contiguous block), the scatter input gradient one tile
// of padded_ld(Cout_g); depthwise weights are packed as one group of C outputs: [taps][C].
// finite: if given, set to whether every weight is finite, found while packing (an OR of the exponent
// bits over the rows just written, which vectorizes), so it costs no pass of its own.
template <typename scalar_t, typename acc_t>
at::Tensor pack_weight(const WeightView<scalar_t>& v, int64_t width, const at::TensorOptions& options,
                       bool* finite = nullptr) {
  const int64_t taps = v.k_h * v.k_w, K = taps * v.ins, tiles = ceil_div(v.outs, width);
  const auto opts = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor wp = v.outs % width == 0 ? at::empty({v.groups * tiles * K * width}, opts)
                                      : at::zeros({v.groups * tiles * K * width}, opts);
  acc_t* out = wp.data_ptr<acc_t>();
  std::vector<int64_t> tap_offset(taps);
  for (int64_t tap = 0; tap < taps; ++tap) tap_offset[tap] = (tap / v.k_w) * v.r_stride + (tap % v.k_w) * v.s_stride;
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, v.groups * tiles, 1, [&](int64_t begin, int64_t end) {
    bool non_finite = false;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / tiles, co0 = (item % tiles) * width, n = std::min(v.outs, co0 + width) - co0;
      const scalar_t* base = v.data + group * v.group_stride + co0 * v.out_stride;
      // one contiguous output row of n channels per (ci, tap); the loop over the weight's
      // fastest-moving of ci and tap goes inside, so each cache line read serves consecutive rows
      const auto copy_row = [&](int64_t ci, int64_t tap) {
        const scalar_t* src = base + ci * v.in_stride + tap_offset[tap];
        acc_t* dst = out + (item * K + tap * v.ins + ci) * width;
        for (int64_t co = 0; co < n; ++co) dst[co] = static_cast<acc_t>(src[co * v.out_stride]);
        if (finite != nullptr) {  // over the row just written, still in L1
          uint32_t bad = 0;       // a local (not the captured flag), so the loop vectorizes
          for (int64_t co = 0; co < n; ++co) bad |= is_non_finite(dst[co]);
          non_finite |= bad != 0;
        }
      };
      if (std::abs(v.in_stride) < std::abs(v.s_stride)) {
        for (int64_t tap = 0; tap < taps; ++tap)
          for (int64_t ci = 0; ci < v.ins; ++ci) copy_row(ci, tap);
      } else {
        for (int64_t ci = 0; ci < v.ins; ++ci)
          for (int64_t tap = 0; tap < taps; ++tap) copy_row(ci, tap);
      }
    }
    if (non_finite) all_finite.store(false, std::memory_order_relaxed);
  });
  if (finite != nullptr) *finite = all_finite.load();
  return wp;
}

// t[i] *= act'(.) for i < n, read off v: the activation's output (from_output) or its input.
template <typename acc_t>
void scale_by_derivative(Activation act, acc_t slope, bool from_output, const acc_t* v, acc_t* t, int64_t n) {
  if (from_output && act == Activation::relu) {  // a select, so the loop vectorizes
    for (int64_t i = 0; i < n; ++i) t[i] = v[i] <= acc_t(0) ? acc_t(0) : t[i];
  } else if (from_output) {
    for (int64_t i = 0; i < n; ++i) t[i] *= activation_derivative_from_output(act, v[i], slope);
  } else {
    for (int64_t i = 0; i < n; ++i) t[i] *= activation_derivative(act, v[i], slope);
  }
}

// grad_output pass: dZ = grad_out * act'(.) into dz_pixels [P][Cout] and/or dz_channels [Cout][ldz], the
// bias gradient (sums over pixels) and the residual gradient (= dZ, in out's layout).
template <typename scalar_t, typename acc_t>
struct GradPass {
  const scalar_t* grad_out;
  PixelLayout grad_layout;
  const scalar_t* saved;  // output or pre-activation (null without activation)
  PixelLayout out_layout;
  Activation act;
  acc_t slope;
  bool saved_is_output;
  acc_t* dz_pixels;    // or null
  acc_t* dz_channels;  // or null
  int64_t ldz;
  acc_t* dbias;         // or null
  scalar_t* dresidual;  // or null

  // Parallel over pixel blocks; each block is a [pixels x channels] tile, read and written in each
  // tensor's contiguous direction (load_tile / store_tile), with per-thread partial bias sums.
  void run(int64_t pixels, int64_t channels) const {
    const int64_t blocks = ceil_div(pixels, kPassPixels), threads = at::get_num_threads();
    std::vector<acc_t> partial(dbias != nullptr ? threads * channels : 0, acc_t(0));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tile(kPassPixels * channels), saved_tile(act != Activation::none ? kPassPixels * channels : 0);
      std::vector<int64_t> offsets(kPassPixels);
      acc_t* sums = dbias != nullptr ? partial.data() + at::get_thread_num() * channels : nullptr;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t p0 = b * kPassPixels, rows = std::min(kPassPixels, pixels - p0);
        acc_t* t = tile.data();
        load_tile(grad_layout, grad_out, p0, rows, 0, channels, t, channels, offsets.data());
        if (act != Activation::none) {
          load_tile(out_layout, saved, p0, rows, 0, channels, saved_tile.data(), channels, offsets.data());
          scale_by_derivative(act, slope, saved_is_output, saved_tile.data(), t, rows * channels);
        }
        if (dresidual != nullptr) store_tile(out_layout, dresidual, p0, rows, 0, channels, t, channels, offsets.data());
        if (sums != nullptr)
          for (int64_t m = 0; m < rows; ++m)
            for (int64_t c = 0; c < channels; ++c) sums[c] += t[m * channels + c];
        if (dz_pixels != nullptr) std::copy(t, t + rows * channels, dz_pixels + p0 * channels);
        if (dz_channels != nullptr) at::vec::transpose_mxn<acc_t>(t, channels, dz_channels + p0, ldz, rows, channels);
      }
    });
    if (dbias == nullptr) return;
    std::fill(dbias, dbias + channels, acc_t(0));
    for (int64_t th = 0; th < threads; ++th)
      for (int64_t c = 0; c < channels; ++c) dbias[c] += partial[th * channels + c];
  }
};

// Weight gradient, GEMM path: dwp[G][Cout_g][ldw] = dZ^T . im2col; dz channel-major [Cout][ldz].
template <typename scalar_t, typename acc_t>
void weight_grad_gemm(const ConvGeometry& g, const scalar_t* x, const acc_t* dz, int64_t ldz, acc_t* dwp, int64_t ldw) {
  const int64_t P = g.pixels(), K = g.gemm_k(), cout_g = g.out_cg();
  const int64_t n_blocks = ceil_div(cout_g, kWgradChannels);
  const int64_t n_width = ceil_div(cout_g, n_blocks);
  const int64_t want = ceil_div(4 * at::get_num_threads(), g.groups * n_blocks);
  const int64_t k_blocks = std::clamp<int64_t>(std::max(ceil_div(K, kWgradDepth), want), 1, ceil_div(K, 16));
  const int64_t k_width = ceil_div(K, k_blocks), lda = padded_ld(k_width);
  at::parallel_for(0, g.groups * n_blocks * k_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(kWgradPixels * lda);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t group = item / (n_blocks * k_blocks);
      const int64_t n0 = ((item / k_blocks) % n_blocks) * n_width, n1 = std::min(cout_g, n0 + n_width);
      const int64_t k0 = (item % k_blocks) * k_width, k1 = std::min(K, k0 + k_width);
      if (n0 >= n1 || k0 >= k1) continue;
      acc_t* dw = dwp + (group * cout_g + n0) * ldw + k0;
      if (P == 0)
        for (int64_t n = n0; n < n1; ++n) std::fill(dw + (n - n0) * ldw, dw + (n - n0) * ldw + (k1 - k0), acc_t(0));
      for (int64_t p0 = 0; p0 < P; p0 += kWgradPixels) {
        const int64_t rows = std::min(kWgradPixels, P - p0);
        const auto [b_tile, b_ld] = im2col_operand(g, x, group, p0, rows, k0, k1, a.data(), lda);
        tile_gemm<acc_t>(n1 - n0, k1 - k0, rows, dz + (group * cout_g + n0) * ldz + p0, ldz, b_tile, b_ld, dw, ldw,
                         p0 > 0);
      }
    }
    tile_gemm_done();
  });
}

// Weight gradient without im2col (direct_applies, x in the accumulation type), for output rows [r0, r1):
// per row and tap, dW_tap += dZ_row^T . x_row, the B operand being x's row itself (pixels stride_w * C_in
// apart, as in forward_direct); dw [Cout][ldw] is zeroed first.
template <typename acc_t>
void weight_grad_rows(const ConvGeometry& g, const acc_t* x, const acc_t* dz, int64_t ldz, acc_t* dw, int64_t ldw,
                      int64_t r0, int64_t r1) {
  const int64_t cg = g.in_cg(), cout_g = g.out_cg();
  const auto columns = tap_columns(g);
  for (int64_t n = 0; n < g.out_c; ++n) std::fill(dw + n * ldw, dw + n * ldw + g.gemm_k(), acc_t(0));
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t n = row / g.out_h, oh = row % g.out_h;
    for (int64_t kh = 0; kh < g.k_h; ++kh) {
      const int64_t ih = oh * g.stride_h - g.pad_h + kh * g.dil_h;
      if (ih < 0 || ih >= g.in_h) continue;
      for (int64_t kw = 0; kw < g.k_w; ++kw) {
        const auto [m_lo, m_hi] = columns[kw];
        if (m_lo >= m_hi) continue;
        const acc_t* b = x + ((n * g.in_h + ih) * g.in_w + m_lo * g.stride_w + kw * g.dil_w - g.pad_w) * g.in_c;
        for (int64_t group = 0; group < g.groups; ++group)
          tile_gemm<acc_t>(cout_g, cg, m_hi - m_lo, dz + group * cout_g * ldz + row * g.out_w + m_lo, ldz,
                           b + group * cg, g.stride_w * g.in_c, dw + group * cout_g * ldw + (kh * g.k_w + kw) * cg, ldw,
                           true);
      }
    }
  }
}

// Weight gradient split over pixels: each thread sums dZ^T . im2col over its own pixel range into its own
// [Cout][ldw] partial (the first into dwp), so x and dZ are read once; the (Cout, K) split above rereads
// both for every K block, which costs more than adding the partials when pixels are many and Cout x K small.
// direct: ranges of whole output rows, through weight_grad_rows.
template <typename scalar_t, typename acc_t>
void weight_grad_by_pixels(const ConvGeometry& g, const scalar_t* x, const acc_t* dz, int64_t ldz, acc_t* dwp,
                           int64_t ldw, int64_t chunks, bool direct) {
  const int64_t P = g.pixels(), K = g.gemm_k(), cout_g = g.out_cg();
  const int64_t lda = padded_ld(std::min(K, kWgradDepth));
  std::vector<acc_t> partials((chunks - 1) * g.out_c * ldw);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(direct ? 0 : kWgradPixels * lda);
    for (int64_t c = begin; c < end; ++c) {
      acc_t* dw_chunk = c == 0 ? dwp : partials.data() + (c - 1) * g.out_c * ldw;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (direct) {
          const int64_t rows_total = g.batch * g.out_h;
          weight_grad_rows(g, x, dz, ldz, dw_chunk, ldw, rows_total * c / chunks, rows_total * (c + 1) / chunks);
          continue;
        }
      }
      const int64_t p_begin = P * c / chunks, p_end = P * (c + 1) / chunks;
      for (int64_t group = 0; group < g.groups; ++group) {
        for (int64_t p0 = p_begin; p0 < p_end; p0 += kWgradPixels) {
          const int64_t rows = std::min(kWgradPixels, p_end - p0);
          for (int64_t k0 = 0; k0 < K; k0 += kWgradDepth) {
            const int64_t k1 = std::min(K, k0 + kWgradDepth);
            const auto [b_tile, b_ld] = im2col_operand(g, x, group, p0, rows, k0, k1, a.data(), lda);
            tile_gemm<acc_t>(cout_g, k1 - k0, rows, dz + group * cout_g * ldz + p0, ldz, b_tile, b_ld,
                             dw_chunk + group * cout_g * ldw + k0, ldw, p0 > p_begin);
          }
        }
      }
    }
    tile_gemm_done();
  });
  using Vec = at::vec::Vectorized<acc_t>;
  at::parallel_for(0, g.out_c, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t n = n0; n < n1; ++n) {
        acc_t* dst = dwp + n * ldw;
        const acc_t* src = partials.data() + ((c - 1) * g.out_c + n) * ldw;
        int64_t k = 0;
        for (; k + Vec::size() <= K; k += Vec::size()) (Vec::loadu(dst + k) + Vec::loadu(src + k)).store(dst + k);
        for (; k < K; ++k) dst[k] += src[k];
      }
    }
  });
}

// Which weight-gradient split moves less memory: by pixels, `chunks` partials of Cout x K written and
// added, against the (Cout, K)-block split, which reads x and dZ again per K block.
int64_t weight_grad_chunks(const ConvGeometry& g) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::min(threads, ceil_div(g.pixels(), kWgradPixels));
  if (chunks < 2) return 0;
  const int64_t reread = ceil_div(g.gemm_k(), kWgradDepth) * g.pixels() * (g.in_c + g.out_c);
  const int64_t partials = 2 * chunks * g.out_c * g.gemm_k();
  return partials < reread ? chunks : 0;
}

// The input gradient by phases. The input pixels (ih, iw) with ih % S_h = a, iw % S_w = b (phase (a, b))
// receive dZ only through the taps r with (a + pad - r * dil) % S == 0, which are every S / gcd(S, dil)-th
// tap; over the phase's pixel grid that is a stride-1 conv of dZ (as input, NHWC) with those taps,
// transposed (Cin <-> Cout per group) and flipped. So the input gradient is S_h * S_w stride-1 convs
// (one when the stride is 1) that together do the forward's multiply-adds, each storing straight into
// its own pixels of dx: no scatter-add, no multiplying by inserted zeros.
struct PhaseAxis {
  int64_t first_tap = 0, tap_step = 1, taps = 0;  // the taps r = first_tap + j * tap_step, j < taps
  int64_t size = 0, pad = 0, dil = 1;             // the phase's pixels along the axis; its conv's padding, dilation
};

// Phase a along one axis of an input of `in` pixels, kernel k; taps == 0: no tap reaches the phase.
PhaseAxis phase_axis(int64_t a, int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  PhaseAxis axis;
  axis.tap_step = stride / std::gcd(stride, dil);
  axis.dil = dil / std::gcd(stride, dil);
  axis.size = a < in ? ceil_div(in - a, stride) : 0;
  const auto reaches = [&](int64_t r) { return ((a + pad - r * dil) % stride + stride) % stride == 0; };
  while (axis.first_tap < k && !reaches(axis.first_tap)) ++axis.first_tap;
  if (axis.first_tap == k) return axis;
  axis.taps = (k - 1 - axis.first_tap) / axis.tap_step + 1;
  // phase pixel i reads dZ at i + (a + pad - r * dil) / S (exact) through tap r; the last tap, first in the
  // flipped conv, has the smallest offset, which is minus that conv's padding
  const int64_t last = axis.first_tap + (axis.taps - 1) * axis.tap_step;
  axis.pad = -(a + pad - last * dil) / stride;
  return axis;
}

// dx (x's shape, memory format fmt) from dZ pixel-major [P][Cout]. The phase convs read dZ's zero padding
// times the weights, products torch does not form: with an inf or NaN weight (found while packing) it
// writes nothing and returns false, and the caller takes the scatter path.
template <typename scalar_t, typename acc_t>
bool input_grad_by_phases(const ConvGeometry& g, const at::Tensor& weight, const acc_t* dz, at::Tensor& dx,
                          at::MemoryFormat fmt) {
  struct Phase {
    int64_t a, b;  // the phase's first input row and column
    ConvGeometry conv;
    at::Tensor wp;
  };
  std::vector<Phase> phases;
  bool every_pixel_reached = true;
  for (int64_t a = 0; a < g.stride_h; ++a) {
    for (int64_t b = 0; b < g.stride_w; ++b) {
      const PhaseAxis rows = phase_axis(a, g.in_h, g.k_h, g.stride_h, g.pad_h, g.dil_h);
      const PhaseAxis cols = phase_axis(b, g.in_w, g.k_w, g.stride_w, g.pad_w, g.dil_w);
      if (rows.size == 0 || cols.size == 0) continue;
      if (rows.taps == 0 || cols.taps == 0) {
        every_pixel_reached = false;  // these pixels get no gradient: zero
        continue;
      }
      ConvGeometry t = g;
      t.in_c = g.out_c, t.in_h = g.out_h, t.in_w = g.out_w, t.out_c = g.in_c, t.out_h = rows.size, t.out_w = cols.size;
      t.k_h = rows.taps, t.k_w = cols.taps, t.stride_h = 1, t.stride_w = 1;
      t.pad_h = rows.pad, t.pad_w = cols.pad, t.dil_h = rows.dil, t.dil_w = cols.dil;
      // the phase's taps of the weight, in and out swapped, flipped: tap (th, tw) is the original
      // (last_r - th * step, last_s - tw * step)
      WeightView<scalar_t> w = view_of<scalar_t>(weight, g.groups);
      const int64_t last_r = rows.first_tap + (rows.taps - 1) * rows.tap_step;
      const int64_t last_s = cols.first_tap + (cols.taps - 1) * cols.tap_step;
      w.data += last_r * w.r_stride + last_s * w.s_stride;
      std::swap(w.outs, w.ins);
      std::swap(w.out_stride, w.in_stride);
      w.k_h = rows.taps, w.k_w = cols.taps, w.r_stride *= -rows.tap_step, w.s_stride *= -cols.tap_step;
      bool finite = true;
      at::Tensor wp = pack_weight<scalar_t, acc_t>(w, kChannelTile, weight.options(), &finite);
      if (!finite) return false;
      phases.push_back({a, b, t, std::move(wp)});
    }
  }
  // with a stride, a phase writes every S-th pixel: into NCHW that is one cache line per value, so the phases
  // write an NHWC buffer, copied into dx at the end
  const bool via_nhwc = g.stride_h * g.stride_w > 1 && fmt != at::MemoryFormat::ChannelsLast;
  at::Tensor target = via_nhwc ? at::empty(dx.sizes(), dx.options().memory_format(at::MemoryFormat::ChannelsLast)) : dx;
  if (!every_pixel_reached) target.zero_();
  const PixelLayout dense = layout_of(g.in_c, g.in_h, g.in_w, via_nhwc ? at::MemoryFormat::ChannelsLast : fmt);
  for (const Phase& phase : phases) {
    const ConvGeometry& t = phase.conv;
    const at::Tensor& wp = phase.wp;
    const PixelLayout layout{t.out_h * t.out_w,
                             t.out_w,
                             dense.image_stride,
                             g.stride_h * dense.row_stride,
                             g.stride_w * dense.pixel_stride,
                             dense.channel_stride};
    scalar_t* origin = target.data_ptr<scalar_t>() + phase.a * dense.row_stride + phase.b * dense.pixel_stride;
    const Epilogue<scalar_t, acc_t> store{nullptr, nullptr, origin, nullptr, layout, Activation::none, acc_t(0)};
    forward_gemm(t, dz, wp.const_data_ptr<acc_t>(), store);
  }
  if (via_nhwc) copy_between_layouts(target, dx);
  return true;
}

// Input gradient with few input channels per group (below kPhaseMinChannels), where the phase convs' GEMMs
// would be a few columns wide: per tap, dcol^T = W_tap^T . dZ (M = channels, N = pixels), scatter-added
// into dx (acc, NCHW); wp [G][K][padded_ld(Cout_g)], dz [Cout][ldz].
template <typename acc_t>
void input_grad_scatter(const ConvGeometry& g, const acc_t* wp, const acc_t* dz, int64_t ldz, acc_t* dx) {
  const int64_t ldw = padded_ld(g.out_cg()), K = g.gemm_k(), cin_g = g.in_cg(), cout_g = g.out_cg(), HW = g.out_hw();
  const int64_t images = g.batch * g.groups;
  const int64_t c_blocks = std::clamp<int64_t>(ceil_div(4 * at::get_num_threads(), images), 1, ceil_div(cin_g, 16));
  const int64_t c_width = ceil_div(cin_g, c_blocks);
  at::parallel_for(0, images * c_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dcol(c_width * kDgradPixels);
    std::vector<int64_t> oh(kDgradPixels), ow(kDgradPixels), target(kDgradPixels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (g.groups * c_blocks), group = (item / c_blocks) % g.groups;
      const int64_t c0 = (item % c_blocks) * c_width, c1 = std::min(cin_g, c0 + c_width);
      if (c0 >= c1) continue;
      const int64_t cc = c1 - c0;
      for (int64_t q0 = 0; q0 < HW; q0 += kDgradPixels) {
        const int64_t rows = std::min(kDgradPixels, HW - q0);
        for (int64_t m = 0; m < rows; ++m) oh[m] = (q0 + m) / g.out_w, ow[m] = (q0 + m) % g.out_w;
        for (int64_t tap = 0; tap < g.taps(); ++tap) {
          const int64_t r = tap / g.k_w, s = tap % g.k_w;
          // where each pixel's column lands in an input plane (-1: in the padding), shared by all channels
          for (int64_t m = 0; m < rows; ++m) {
            const int64_t ih = oh[m] * g.stride_h - g.pad_h + r * g.dil_h;
            const int64_t iw = ow[m] * g.stride_w - g.pad_w + s * g.dil_w;
            target[m] = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w ? ih * g.in_w + iw : -1;
          }
          tile_gemm<acc_t>(cc, rows, cout_g, wp + (group * K + tap * cin_g + c0) * ldw, ldw,
                           dz + group * cout_g * ldz + n * HW + q0, ldz, dcol.data(), rows, false);
          for (int64_t ci = 0; ci < cc; ++ci) {
            acc_t* plane = dx + ((n * g.in_c + group * cin_g + c0 + ci) * g.in_h) * g.in_w;
            const acc_t* src = dcol.data() + ci * rows;
            for (int64_t m = 0; m < rows; ++m)
              if (target[m] >= 0) plane[target[m]] += src[m];
          }
        }
      }
    }
    tile_gemm_done();
  });
}

// Depthwise input gradient, direct gather: dz pixel-major [P][C]; dx stored in x's layout.
template <typename scalar_t, typename acc_t>
void input_grad_depthwise(const ConvGeometry& g, const acc_t* wp, const acc_t* dz, scalar_t* dx,
                          const PixelLayout& dx_layout) {
  const int64_t C = g.in_c, in_pixels = g.batch * g.in_h * g.in_w;
  at::parallel_for(0, in_pixels, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    std::vector<int64_t> offsets(1);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / (g.in_h * g.in_w), ih = (q / g.in_w) % g.in_h, iw = q % g.in_w;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t r = 0; r < g.k_h; ++r) {
        const int64_t hn = ih + g.pad_h - r * g.dil_h;
        if (hn < 0 || hn % g.stride_h != 0 || hn / g.stride_h >= g.out_h) continue;
        for (int64_t s = 0; s < g.k_w; ++s) {
          const int64_t wn = iw + g.pad_w - s * g.dil_w;
          if (wn < 0 || wn % g.stride_w != 0 || wn / g.stride_w >= g.out_w) continue;
          const acc_t* d = dz + (n * g.out_hw() + (hn / g.stride_h) * g.out_w + wn / g.stride_w) * C;
          const acc_t* w = wp + (r * g.k_w + s) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += d[c] * w[c];
        }
      }
      for_tile<acc_t>(dx_layout, q, 1, 0, C, C, offsets.data(),
                      [&](int64_t i, int64_t o) { dx[o] = static_cast<scalar_t>(acc[i]); });
    }
  });
}

// Depthwise weight gradient: dwp[taps][C] = sum over pixels of dZ * x, per-thread partial sums.
template <typename scalar_t, typename acc_t>
void weight_grad_depthwise(const ConvGeometry& g, const scalar_t* x, const acc_t* dz, acc_t* dwp) {
  const int64_t C = g.out_c, P = g.pixels(), taps = g.taps();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P));
  std::vector<acc_t> partial(chunks * taps * C, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_row(C);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* part = partial.data() + chunk * taps * C;
      for (int64_t p = chunk * P / chunks; p < (chunk + 1) * P / chunks; ++p) {
        const acc_t* d = dz + p * C;
        for_each_tap(g, p, [&](int64_t tap, int64_t pixel) {
          const acc_t* xr = input_row(x + pixel * C, x_row.data(), C);
          acc_t* w = part + tap * C;
          for (int64_t c = 0; c < C; ++c) w[c] += d[c] * xr[c];
        });
      }
    }
  });
  std::fill(dwp, dwp + taps * C, acc_t(0));
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < taps * C; ++i) dwp[i] += partial[chunk * taps * C + i];
}

// Whether some output row or column has every tap in the padding (its pixels reach no x through a tap).
bool reads_only_padding(const ConvGeometry& g) {
  const auto empty = [](int64_t outs, int64_t ins, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
    for (int64_t o = 0; o < outs; ++o) {
      bool any = false;
      for (int64_t r = 0; r < k; ++r) any |= o * stride - pad + r * dil >= 0 && o * stride - pad + r * dil < ins;
      if (!any) return true;
    }
    return false;
  };
  return empty(g.out_h, g.in_h, g.k_h, g.stride_h, g.pad_h, g.dil_h) ||
         empty(g.out_w, g.in_w, g.k_w, g.stride_w, g.pad_w, g.dil_w);
}

// torch's weight gradient also sums 0 * dz over the taps that read the padding (im2col's zeros): NaN where
// dz is inf or NaN; the depthwise and direct weight gradients skip those taps. Such a dz makes some dw
// [rows x cols] (leading dimension ld) non-finite, since a tap inside the image multiplies it by x, unless
// its pixel reads only padding: otherwise, with every dw finite, the products are all zero.
template <typename acc_t>
bool padding_products_matter(const ConvGeometry& g, const acc_t* dw, int64_t rows, int64_t cols, int64_t ld) {
  bool non_finite = false;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) non_finite |= is_non_finite(dw[r * ld + c]);
  return non_finite || reads_only_padding(g);
}

// The depthwise weight gradient's padding products (slow; only where padding_products_matter).
template <typename acc_t>
void add_padding_products(const ConvGeometry& g, const acc_t* dz, acc_t* dwp) {
  const int64_t C = g.out_c;
  for (int64_t p = 0; p < g.pixels(); ++p) {
    const int64_t oh = (p % g.out_hw()) / g.out_w, ow = p % g.out_w;
    for (int64_t r = 0; r < g.k_h; ++r) {
      const int64_t ih = oh * g.stride_h - g.pad_h + r * g.dil_h;
      for (int64_t s = 0; s < g.k_w; ++s) {
        const int64_t iw = ow * g.stride_w - g.pad_w + s * g.dil_w;
        if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) continue;
        acc_t* w = dwp + (r * g.k_w + s) * C;
        for (int64_t c = 0; c < C; ++c) w[c] += acc_t(0) * dz[p * C + c];
      }
    }
  }
}

bool has_padding(at::IntArrayRef padding) {
  return std::any_of(padding.begin(), padding.end(), [](int64_t p) { return p > 0; });
}

// The input as the kernels read it, NHWC, and the geometry to read it with. A strided 1x1 conv without padding
// on NCHW input reads every stride-th pixel: those are picked before the NHWC copy (a quarter of the input at
// stride 2), and the conv runs as a stride-1 one on them.
std::pair<at::Tensor, ConvGeometry> nhwc_input(const at::Tensor& x_in, const ConvGeometry& g, at::IntArrayRef padding) {
  const bool unpadded = padding[0] == 0 && padding[1] == 0 && padding[2] == 0 && padding[3] == 0;
  if (!(g.k_h == 1 && g.k_w == 1 && (g.stride_h > 1 || g.stride_w > 1) && unpadded &&
        format_of(x_in) != at::MemoryFormat::ChannelsLast))
    return {channels_last(x_in), g};
  ConvGeometry gx = g;
  gx.in_h = g.out_h, gx.in_w = g.out_w, gx.stride_h = 1, gx.stride_w = 1;
  const at::Tensor picked = x_in.slice(2, 0, (g.out_h - 1) * g.stride_h + 1, g.stride_h)
                                .slice(3, 0, (g.out_w - 1) * g.stride_w + 1, g.stride_w);
  return {picked.contiguous(at::MemoryFormat::ChannelsLast), gx};  // strided: the generic copy
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

ConvFwdResult conv2d_fwd(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope, bool save_preact) {
  const ConvGeometry g = geometry_of(x_in, weight, stride, padding, dilation, groups);
  const at::MemoryFormat fmt = format_of(x_in);
  const auto opts = x_in.options().memory_format(fmt);
  at::Tensor out = at::empty({g.batch, g.out_c, g.out_h, g.out_w}, opts);
  at::Tensor preact = save_preact ? at::empty_like(out) : at::empty({0}, x_in.options());
  if (out.numel() == 0) return {out, preact};
  const at::ScalarType acc = acc_type_of(x_in.scalar_type());
  const auto [x, gx] = nhwc_input(x_in, g, padding);
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  const PixelLayout out_layout = layout_of(g.out_c, g.out_h, g.out_w, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bmkernels_conv2d_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the depthwise and direct loops skip the taps that read the padding, where torch multiplies 0 * w
    // (NaN for an inf or NaN weight): non-finite weights, found while packing, take the im2col path
    const bool skips_padding =
        has_padding(padding) && (g.depthwise() || (std::is_same_v<scalar_t, acc_t> && direct_applies(gx)));
    bool finite = true;
    at::Tensor wp = g.depthwise() ? pack_weight<scalar_t, acc_t>(view_of<scalar_t>(weight, 1), g.out_c,
                                                                 weight.options(), skips_padding ? &finite : nullptr)
                                  : pack_weight<scalar_t, acc_t>(view_of<scalar_t>(weight, g.groups), kChannelTile,
                                                                 weight.options(), skips_padding ? &finite : nullptr);
    const bool depthwise = g.depthwise() && finite;
    if (g.depthwise() && !depthwise)
      wp = pack_weight<scalar_t, acc_t>(view_of<scalar_t>(weight, g.groups), kChannelTile, weight.options());
    const Epilogue<scalar_t, acc_t> ep{bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr,
                                       res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
                                       out.data_ptr<scalar_t>(),
                                       save_preact ? preact.data_ptr<scalar_t>() : nullptr,
                                       out_layout,
                                       static_cast<Activation>(activation),
                                       static_cast<acc_t>(slope)};
    if (depthwise) {
      forward_depthwise(gx, x.const_data_ptr<scalar_t>(), wp.const_data_ptr<acc_t>(), ep);
    } else {
      forward_gemm(gx, x.const_data_ptr<scalar_t>(), wp.const_data_ptr<acc_t>(), ep, finite);
    }
  });
  return {out, preact};
}

ConvBwdResult conv2d_bwd(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight,
                         const at::Tensor& act_saved, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, int64_t activation, double slope,
                         bool saved_is_output, std::array<bool, 4> output_mask) {
  const ConvGeometry g = geometry_of(x_in, weight, stride, padding, dilation, groups);
  const at::MemoryFormat fmt = format_of(x_in);
  const at::ScalarType acc = acc_type_of(x_in.scalar_type());
  const auto [need_dx, need_dw, need_db, need_dres] = output_mask;
  // gradients not asked for come back as empty tensors
  const auto none = [&] { return at::empty({0}, x_in.options()); };
  at::Tensor dx = need_dx ? at::empty(x_in.sizes(), x_in.options().memory_format(fmt)) : none();
  // in x's memory format, as a channels_last model's weights are (AccumulateGrad keeps it without a copy)
  at::Tensor dw = need_dw ? at::empty(weight.sizes(), weight.options().memory_format(fmt)) : none();
  at::Tensor db = need_db ? at::empty({g.out_c}, weight.options().dtype(acc)) : none();
  at::Tensor dres =
      need_dres ? at::empty({g.batch, g.out_c, g.out_h, g.out_w}, x_in.options().memory_format(fmt)) : none();
  if (g.pixels() == 0 || g.out_c == 0) {  // nothing flows back: every gradient is zero
    for (at::Tensor* t : {&dx, &dw, &db, &dres}) t->zero_();
    if (need_db) db = db.to(weight.scalar_type());
    return {dx, dw, db, dres};
  }
  const Activation act = static_cast<Activation>(activation);
  const at::Tensor grad_out = dense(grad_out_in);
  const at::Tensor saved = act == Activation::none ? at::Tensor() : act_saved.contiguous(fmt);
  // only the weight gradient reads x (NHWC, with the geometry gx)
  const auto [x, gx] = need_dw ? nhwc_input(x_in, g, padding) : std::make_pair(x_in, g);
  const int64_t P = g.pixels(), ldz = padded_ld(P), ldw = padded_ld(g.gemm_k());
  const bool by_phases = g.in_cg() >= kPhaseMinChannels;
  // dZ pixel-major [P][Cout] feeds the depthwise loops and the input gradient by phases (convs of dZ);
  // channel-major [Cout][ldz] feeds the weight-gradient GEMM and the scatter input gradient
  const bool want_pixels = g.depthwise() || (need_dx && by_phases);
  const bool want_channels = !g.depthwise() && (need_dw || (need_dx && !by_phases));
  at::Tensor dz_pixels = cached_empty({want_pixels ? P * g.out_c : 0}, x.options().dtype(acc));
  at::Tensor dz_channels = cached_empty({want_channels ? g.out_c * ldz : 0}, x.options().dtype(acc));
  at::Tensor dx_acc;
  at::Tensor dwp = at::empty({g.depthwise() ? g.taps() * g.out_c : g.out_c * ldw}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bmkernels_conv2d_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradPass<scalar_t, acc_t> pass{grad_out.const_data_ptr<scalar_t>(),
                                         layout_of(g.out_c, g.out_h, g.out_w, format_of(grad_out)),
                                         saved.defined() ? saved.const_data_ptr<scalar_t>() : nullptr,
                                         layout_of(g.out_c, g.out_h, g.out_w, fmt),
                                         act,
                                         static_cast<acc_t>(slope),
                                         saved_is_output,
                                         want_pixels ? dz_pixels.data_ptr<acc_t>() : nullptr,
                                         want_channels ? dz_channels.data_ptr<acc_t>() : nullptr,
                                         ldz,
                                         need_db ? db.data_ptr<acc_t>() : nullptr,
                                         need_dres ? dres.data_ptr<scalar_t>() : nullptr};
    pass.run(P, g.out_c);
    if (!need_dx && !need_dw) return;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const PixelLayout dx_layout = layout_of(g.in_c, g.in_h, g.in_w, fmt);
    if (g.depthwise()) {
      const at::Tensor wp = pack_weight<scalar_t, acc_t>(view_of<scalar_t>(weight, 1), g.out_c, weight.options());
      if (need_dx)
        input_grad_depthwise(g, wp.const_data_ptr<acc_t>(), dz_pixels.const_data_ptr<acc_t>(), dx.data_ptr<scalar_t>(),
                             dx_layout);
      if (need_dw) {
        weight_grad_depthwise(gx, xp, dz_pixels.const_data_ptr<acc_t>(), dwp.data_ptr<acc_t>());
        if (has_padding(padding) && padding_products_matter(gx, dwp.const_data_ptr<acc_t>(), 1, g.taps() * g.out_c, 0))
          add_padding_products(gx, dz_pixels.const_data_ptr<acc_t>(), dwp.data_ptr<acc_t>());
      }
      return;
    }
    bool scatter = need_dx && !by_phases;
    if (need_dx && by_phases &&
        !input_grad_by_phases<scalar_t, acc_t>(g, weight, dz_pixels.const_data_ptr<acc_t>(), dx, fmt)) {
      scatter = true;  // a non-finite weight (rare): the scatter path reads dZ channel-major
      if (!want_channels) {
        dz_channels = at::empty({g.out_c * ldz}, dz_pixels.options());
        dz_channels.view({g.out_c, ldz}).narrow(1, 0, P).copy_(dz_pixels.view({P, g.out_c}).t());
      }
    }
    if (scatter) {
      const at::Tensor wp =
          pack_weight<scalar_t, acc_t>(view_of<scalar_t>(weight, g.groups), padded_ld(g.out_cg()), weight.options());
      dx_acc = cached_empty({g.batch, g.in_c, g.in_h, g.in_w}, x.options().dtype(acc)).zero_();
      input_grad_scatter(g, wp.const_data_ptr<acc_t>(), dz_channels.const_data_ptr<acc_t>(), ldz,
                         dx_acc.data_ptr<acc_t>());
    }
    const auto weight_grad = [&](bool direct) {
      const int64_t chunks =
          direct ? std::clamp<int64_t>(at::get_num_threads(), 1, gx.batch * gx.out_h) : weight_grad_chunks(gx);
      if (chunks > 0) {
        weight_grad_by_pixels(gx, xp, dz_channels.const_data_ptr<acc_t>(), ldz, dwp.data_ptr<acc_t>(), ldw, chunks,
                              direct);
      } else {
        weight_grad_gemm(gx, xp, dz_channels.const_data_ptr<acc_t>(), ldz, dwp.data_ptr<acc_t>(), ldw);
      }
    };
    if (need_dw) {
      const bool direct = std::is_same_v<scalar_t, acc_t> && direct_applies(gx);
      weight_grad(direct);
      // the direct rows skip the padding taps: where their products matter, im2col forms them (slow, rare)
      if (direct && has_padding(padding) &&
          padding_products_matter(gx, dwp.const_data_ptr<acc_t>(), g.out_c, g.gemm_k(), ldw))
        weight_grad(false);
    }
  });
  if (dx_acc.defined()) dx.copy_(dx_acc);
  if (need_dw) {
    if (g.depthwise()) {
      dw.copy_(dwp.view({g.k_h, g.k_w, g.out_c}).permute({2, 0, 1}).unsqueeze(1));
    } else {
      dw.copy_(dwp.view({g.out_c, ldw})
                   .narrow(1, 0, g.gemm_k())
                   .reshape({g.groups, g.out_cg(), g.k_h, g.k_w, g.in_cg()})
                   .permute({0, 1, 4, 2, 3})
                   .reshape({g.out_c, g.in_cg(), g.k_h, g.k_w}));
    }
  }
  if (need_db) db = db.to(weight.scalar_type());
  return {dx, dw, db, dres};
}

}  // namespace bmk::cpu::CPU_CAPABILITY
