// What the engine's kernels share: loads and stores of f32, f16 and bf16 through f32, in
// which every kernel computes.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void from_f32(float v, float *out) { *out = v; }
__device__ __forceinline__ void from_f32(float v, __half *out) { *out = __float2half(v); }
__device__ __forceinline__ void from_f32(float v, __nv_bfloat16 *out) { *out = __float2bfloat16(v); }
