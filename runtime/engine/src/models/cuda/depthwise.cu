// Depthwise 2-D convolution for the CUDA build: one thread per output element, accumulating in
// f32 whatever the storage type. candle has no grouped conv kernel (its conv2d launches one conv
// per group), and building the conv from shifted multiply-adds costs a full pass over the
// activation per kernel tap; the detector's large-kernel FPN has up to 81 taps per layer.
//
// x: [n, c, h, w], weight: [c, kh, kw], bias: [c], all contiguous; y: [n, c, ho, wo].
#include "common.cuh"

template <typename T>
__device__ void depthwise_conv2d(const T *x, const T *weight, const T *bias, T *y, uint32_t n,
                                 uint32_t c, uint32_t h, uint32_t w, uint32_t kh, uint32_t kw,
                                 uint32_t sh, uint32_t sw, uint32_t pt, uint32_t pl, uint32_t ho,
                                 uint32_t wo) {
  const uint64_t total = (uint64_t)n * c * ho * wo;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const uint32_t ox = i % wo;
    const uint32_t oy = (i / wo) % ho;
    const uint64_t plane = i / ((uint64_t)wo * ho);  // batch * c + channel
    const uint32_t ch = plane % c;
    const T *src = x + plane * h * w;
    const T *k = weight + (uint64_t)ch * kh * kw;
    const int y0 = (int)(oy * sh) - (int)pt;
    const int x0 = (int)(ox * sw) - (int)pl;
    float acc = to_f32(bias[ch]);
    for (uint32_t ky = 0; ky < kh; ++ky) {
      const int iy = y0 + (int)ky;
      if (iy < 0 || iy >= (int)h) continue;
      const T *row = src + (uint64_t)iy * w;
      for (uint32_t kx = 0; kx < kw; ++kx) {
        const int ix = x0 + (int)kx;
        if (ix < 0 || ix >= (int)w) continue;
        acc += to_f32(row[ix]) * to_f32(k[ky * kw + kx]);
      }
    }
    from_f32(acc, &y[i]);
  }
}

#define DEPTHWISE(NAME, T)                                                                   \
  extern "C" __global__ void NAME(const T *x, const T *weight, const T *bias, T *y,          \
                                  uint32_t n, uint32_t c, uint32_t h, uint32_t w,            \
                                  uint32_t kh, uint32_t kw, uint32_t sh, uint32_t sw,        \
                                  uint32_t pt, uint32_t pl, uint32_t ho, uint32_t wo) {      \
    depthwise_conv2d<T>(x, weight, bias, y, n, c, h, w, kh, kw, sh, sw, pt, pl, ho, wo);     \
  }

DEPTHWISE(depthwise_conv2d_f32, float)
DEPTHWISE(depthwise_conv2d_f16, __half)
DEPTHWISE(depthwise_conv2d_bf16, __nv_bfloat16)
