// What follows a conv or linear layer, in one in-place pass over its fresh output:
// `y = act(y + bias) * scale + shift`, computed in f32. candle would make a full pass (and a
// new buffer) for each of the bias add, the activation and the affine; on the detector's
// large maps those passes cost more than the convs themselves.
//
// Bias index: per column (`per_column`, a linear layer: `i % cols`) or per row of a
// `[n, rows, inner]` conv output, one bias per `repeat` rows.
#include "common.cuh"

// Activation codes, as `Activation` in layers.rs maps them.
#define ACT_NONE 0
#define ACT_RELU 1
#define ACT_GELU_ERF 2
#define ACT_SWISH 3
#define ACT_SIGMOID 4
#define ACT_HARD_SIGMOID 5
#define ACT_HARD_SWISH 6

__device__ __forceinline__ float activate(float v, uint32_t act, float alpha, float beta) {
  switch (act) {
    case ACT_RELU: return fmaxf(v, 0.0f);
    case ACT_GELU_ERF: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_SWISH: return v / (1.0f + expf(-v));
    case ACT_SIGMOID: return 1.0f / (1.0f + expf(-v));
    case ACT_HARD_SIGMOID: return fminf(fmaxf(v * alpha + beta, 0.0f), 1.0f);
    case ACT_HARD_SWISH: return v * fminf(fmaxf(v * alpha + beta, 0.0f), 1.0f);
    default: return v;
  }
}

template <typename T>
__device__ void epilogue(T *y, const T *bias, uint64_t total, uint32_t has_bias,
                         uint32_t per_column, uint32_t cols, uint32_t rows, uint32_t inner,
                         uint32_t repeat, uint32_t act, float alpha, float beta,
                         uint32_t has_affine, float scale, float shift) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (uint64_t)gridDim.x * blockDim.x) {
    float v = to_f32(y[i]);
    if (has_bias) {
      const uint64_t b = per_column ? i % cols : ((i / inner) % rows) / repeat;
      v += to_f32(bias[b]);
    }
    v = activate(v, act, alpha, beta);
    if (has_affine) v = v * scale + shift;
    from_f32(v, &y[i]);
  }
}

#define EPILOGUE(NAME, T)                                                                    \
  extern "C" __global__ void NAME(T *y, const T *bias, uint64_t total, uint32_t has_bias,    \
                                  uint32_t per_column, uint32_t cols, uint32_t rows,         \
                                  uint32_t inner, uint32_t repeat, uint32_t act, float alpha, \
                                  float beta, uint32_t has_affine, float scale, float shift) { \
    epilogue<T>(y, bias, total, has_bias, per_column, cols, rows, inner, repeat, act, alpha,  \
                beta, has_affine, scale, shift);                                             \
  }

EPILOGUE(epilogue_f32, float)
EPILOGUE(epilogue_f16, __half)
EPILOGUE(epilogue_bf16, __nv_bfloat16)
