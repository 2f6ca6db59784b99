// NF4 on the CPU, natively: the same bytes and values as the torch reference
// (minilora/quant/nf4.py), in one pass over memory instead of a dozen.
//
//   nf4_pack(A (n,) fp32/bf16/fp16, midpoints (15,) fp32, blocksize)
//       -> (packed uint8 [(n+1)/2], absmax fp32 [n_blocks], finite bool)
//   nf4_unpack(packed, scales fp32 [n_blocks], levels (16,) fp32, n, blocksize, dtype) -> W_hat (n,) dtype
//   dq_scales(codes uint8 [n_blocks], absmax2 fp32 [n_blocks2], offset fp32 (1,), dynamic_map (256,), 256)
//       -> scales fp32 [n_blocks]
//
// Quantize, per block: absmax = max|x|; full blocks scale by the fp32 reciprocal 1/max(absmax, 1e-38),
// a partial last block divides by max(absmax, 1e-38) (and stores that); clamp to [-1, 1]; the code is
// the number of midpoints strictly below the value (torch.bucketize: ties go to the lower code); two
// codes per byte, the first in the high nibble; an odd count is padded with the code of 0.0.
//
// Every entry point checks its arguments against the lengths it will index (TORCH_CHECK: a Python
// RuntimeError), so a damaged state is refused before any read; the loops themselves never check.
//
// Dequantize: level[code] × scale[block] in fp32, rounded once to the output dtype. Within a block
// there are only 16 distinct outputs, so each block first builds its 16-entry table (16 products,
// 16 roundings), then every output is a table lookup: with SSSE3, pshufb looks up 16 codes at once
// in the table's low-byte and high-byte planes, giving 16-bit bf16/fp16 values with no arithmetic.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdlib>
#include <map>
#include <mutex>
#if defined(__SSSE3__) || defined(__F16C__)
#include <immintrin.h>
#endif

// ------------------------------------------------------------------------------------ argument checks
// ⌈n / d⌉ for n >= 0, d > 0, without the overflow of (n + d - 1) / d near INT64_MAX.
static inline int64_t ceil_div(int64_t n, int64_t d) { return n / d + (n % d != 0); }

static void check_cpu(const torch::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got one on ", t.device(),
              "; move it with .cpu() or use the torch reference path");
}

// ------------------------------------------------------------------------------------ quantize
template <typename T>
static void pack_kernel(const T* A, const float* mid_in, uint8_t* out, float* absmax, int64_t n, int64_t bs,
                        bool* finite) {
  float mid[15];
  std::memcpy(mid, mid_in, sizeof(mid));
  const int64_t n_blocks = (n + bs - 1) / bs, full_blocks = n / bs;
  std::atomic<bool> all_finite{true};
  at::parallel_for(0, n_blocks, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(bs + 1);
    std::vector<uint8_t> codes(bs + 1);
    bool ok = true;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * bs, count = std::min(n, first + bs) - first;
      float m = 0.0f;
      for (int64_t i = 0; i < count; ++i) {
        const float v = static_cast<float>(A[first + i]);
        ok &= std::isfinite(v);
        scaled[i] = v;
        m = std::max(m, std::fabs(v));
      }
      const bool partial = b >= full_blocks;
      const float safe = std::max(m, 1e-38f), inv = 1.0f / safe;
      absmax[b] = partial ? safe : m;
      if (partial) {
        for (int64_t i = 0; i < count; ++i) scaled[i] = std::min(1.0f, std::max(-1.0f, scaled[i] / safe));
      } else {
        for (int64_t i = 0; i < count; ++i) scaled[i] = std::min(1.0f, std::max(-1.0f, scaled[i] * inv));
      }
      scaled[count] = 0.0f;  // the pad of an odd count: 0.0's code
      const int64_t even = count + (count & 1);
      for (int64_t i = 0; i < even; ++i) {  // branch-free bucketize: vectorizes
        uint8_t c = 0;
        for (int k = 0; k < 15; ++k) c += (mid[k] < scaled[i]);
        codes[i] = c;
      }
      for (int64_t j = 0; j < even / 2; ++j) out[first / 2 + j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
    }
    if (!ok) all_finite = false;
  });
  *finite = all_finite;
}

std::vector<torch::Tensor> nf4_pack(torch::Tensor A, torch::Tensor midpoints, int64_t blocksize) {
  TORCH_CHECK(A.device().is_cpu() && A.is_contiguous(), "nf4_pack: A must be a contiguous CPU tensor");
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "nf4_pack: blocksize must be positive and even, got ", blocksize,
              "; NF4 blocks are a power of two from 32 to 4096");
  check_cpu(midpoints, "nf4_pack", "midpoints");
  TORCH_CHECK(midpoints.numel() == 15, "nf4_pack: midpoints must hold the 15 boundaries between the 16 NF4 levels, got ",
              midpoints.numel(), " values");
  const int64_t n = A.numel();
  auto packed = torch::empty({(n + 1) / 2}, torch::dtype(torch::kUInt8));
  auto absmax = torch::empty({ceil_div(n, blocksize)}, torch::dtype(torch::kFloat32));
  auto mid = midpoints.contiguous().to(torch::kFloat32);
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "nf4_pack", [&] {
    pack_kernel<scalar_t>(A.data_ptr<scalar_t>(), mid.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                          absmax.data_ptr<float>(), n, blocksize, &finite);
  });
  return {packed, absmax, torch::tensor(finite)};
}

// ------------------------------------------------------------------------------------ dequantize
template <typename T>
static void unpack_block_scalar(const uint8_t* in, const T* table, T* out, int64_t count) {
  int64_t i = 0;
  for (; i + 1 < count; i += 2) {
    const uint8_t byte = in[i >> 1];
    out[i] = table[byte >> 4];
    out[i + 1] = table[byte & 15];
  }
  if (i < count) out[i] = table[in[i >> 1] >> 4];
}

// 16-bit outputs (bf16, fp16): look codes up in the table's two byte planes with pshufb.
template <typename T>
static void unpack_block_16bit(const uint8_t* in, const T* table, T* out, int64_t count) {
  int64_t i = 0;
#if defined(__SSSE3__)
  static_assert(sizeof(T) == 2, "16-bit outputs only");
  uint8_t lo_plane[16], hi_plane[16];
  for (int k = 0; k < 16; ++k) {
    uint16_t bits;
    std::memcpy(&bits, &table[k], 2);
    lo_plane[k] = bits & 0xff;
    hi_plane[k] = bits >> 8;
  }
  const __m128i lo_tab = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo_plane));
  const __m128i hi_tab = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi_plane));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (; i + 32 <= count; i += 32) {  // 16 packed bytes -> 32 outputs
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + (i >> 1)));
    const __m128i first = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);  // high nibbles: even elements
    const __m128i second = _mm_and_si128(raw, nibble);                    // low nibbles: odd elements
    const __m128i idx[2] = {_mm_unpacklo_epi8(first, second), _mm_unpackhi_epi8(first, second)};  // in order
    for (int h = 0; h < 2; ++h) {
      const __m128i lo = _mm_shuffle_epi8(lo_tab, idx[h]), hi = _mm_shuffle_epi8(hi_tab, idx[h]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16 * h), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16 * h + 8), _mm_unpackhi_epi8(lo, hi));
    }
  }
#endif
  unpack_block_scalar<T>(in + (i >> 1), table, out + i, count - i);
}

// The 16 outputs of one block: level × scale in fp32, rounded once (to nearest even) to T.
template <typename T>
static inline void make_table(const float* levels, float scale, T* table) {
  for (int k = 0; k < 16; ++k) table[k] = static_cast<T>(levels[k] * scale);
}

static inline void make_table(const float* levels, float scale, c10::BFloat16* table) {
  uint16_t bits16[16];
  for (int k = 0; k < 16; ++k) {  // fp32 -> bf16, round to nearest even, with integer ops (vectorizes)
    const float v = levels[k] * scale;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    bits16[k] = (v != v) ? uint16_t(0x7fc0) : uint16_t(rounded);
  }
  std::memcpy(table, bits16, sizeof(bits16));
}

static inline void make_table(const float* levels, float scale, c10::Half* table) {
#if defined(__F16C__)
  const __m256 s = _mm256_set1_ps(scale);
  const __m128i a = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(levels), s), _MM_FROUND_TO_NEAREST_INT);
  const __m128i b = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(levels + 8), s), _MM_FROUND_TO_NEAREST_INT);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(table), a);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(table + 8), b);
#else
  for (int k = 0; k < 16; ++k) table[k] = static_cast<c10::Half>(levels[k] * scale);
#endif
}

template <typename T>
static void unpack_kernel(const uint8_t* packed, const float* scales, const float* levels, T* out, int64_t n, int64_t bs) {
  const int64_t n_blocks = (n + bs - 1) / bs;
  at::parallel_for(0, n_blocks, 256, [&](int64_t begin, int64_t end) {
    T table[16];
    for (int64_t b = begin; b < end; ++b) {
      make_table(levels, scales[b], table);
      const int64_t first = b * bs, count = std::min(n, first + bs) - first;
      if constexpr (sizeof(T) == 2) {
        unpack_block_16bit<T>(packed + first / 2, table, out + first, count);
      } else {
        unpack_block_scalar<T>(packed + first / 2, table, out + first, count);
      }
    }
  });
}

// A fresh output of many MB costs more in page faults than in arithmetic: the kernel maps and zeroes
// new memory 4 KB at a time. Dequantized weights are short-lived and come back in the same few sizes
// (every layer of a model, every step), so their buffers are recycled: when such a tensor dies its
// memory goes to a small pool (at most MINILORA_NF4_POOL_MB, default 256) and the next output of that
// size reuses it, already mapped. Like PyTorch's CUDA caching allocator, on the CPU, for these only.
namespace {
std::mutex pool_mutex;
std::multimap<size_t, void*> pool;  // bytes -> free buffer
size_t pool_bytes = 0;

size_t pool_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("MINILORA_NF4_POOL_MB");
    return static_cast<size_t>(env ? std::atoll(env) : 256) << 20;
  }();
  return limit;
}

void* take(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    auto it = pool.find(bytes);
    if (it != pool.end()) {
      void* ptr = it->second;
      pool.erase(it);
      pool_bytes -= bytes;
      return ptr;
    }
  }
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, 64, bytes) == 0, "nf4_unpack: out of memory for ", bytes, " bytes");
  return ptr;
}

void give(void* ptr, size_t bytes) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (pool_bytes + bytes <= pool_limit()) {
    pool.emplace(bytes, ptr);
    pool_bytes += bytes;
  } else {
    free(ptr);
  }
}
}  // namespace

static torch::Tensor empty_output(int64_t n, torch::ScalarType dtype) {
  const size_t bytes = static_cast<size_t>(n) * c10::elementSize(dtype);
  if (bytes < (size_t(1) << 20) || pool_limit() == 0) return torch::empty({n}, torch::dtype(dtype));
  void* ptr = take(bytes);
  return torch::from_blob(ptr, {n}, [bytes](void* p) { give(p, bytes); }, torch::dtype(dtype));
}

torch::Tensor nf4_unpack(torch::Tensor packed, torch::Tensor scales, torch::Tensor levels, int64_t n, int64_t blocksize,
                         torch::ScalarType dtype) {
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous(), "nf4_unpack: packed must be a contiguous CPU tensor");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8, "nf4_unpack: packed codes must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(n >= 0, "nf4_unpack: n (the number of values) must be >= 0, got ", n);
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "nf4_unpack: blocksize must be positive and even, got ", blocksize,
              "; NF4 blocks are a power of two from 32 to 4096");
  TORCH_CHECK(packed.numel() >= (n + 1) / 2, "nf4_unpack: ", n, " values need ", (n + 1) / 2,
              " packed bytes (two codes per byte), got ", packed.numel(), ": codes and state do not belong together");
  check_cpu(scales, "nf4_unpack", "scales");
  TORCH_CHECK(scales.is_floating_point(), "nf4_unpack: scales must be floating point (fp32 block scales), got ",
              scales.scalar_type(), "; decode double-quant codes with dq_scales first");
  TORCH_CHECK(scales.numel() >= ceil_div(n, blocksize), "nf4_unpack: ", n, " values in blocks of ", blocksize,
              " need ", ceil_div(n, blocksize), " block scales, got ", scales.numel());
  check_cpu(levels, "nf4_unpack", "levels");
  TORCH_CHECK(levels.numel() == 16, "nf4_unpack: levels must hold the 16 NF4 levels, got ", levels.numel(), " values");
  auto out = empty_output(n, dtype);
  auto s = scales.contiguous().to(torch::kFloat32);
  auto lv = levels.contiguous().to(torch::kFloat32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nf4_unpack", [&] {
    unpack_kernel<scalar_t>(packed.data_ptr<uint8_t>(), s.data_ptr<float>(), lv.data_ptr<float>(),
                            out.data_ptr<scalar_t>(), n, blocksize);
  });
  return out;
}

// Double quant: the fp32 absmax of each block from its 8-bit code: code[q] × absmax2[b / scale_block] + offset,
// a product then a sum, each rounded (built with -ffp-contract=off: no fused multiply-add).
torch::Tensor dq_scales(torch::Tensor codes, torch::Tensor absmax2, torch::Tensor offset, torch::Tensor dynamic_map,
                        int64_t scale_block) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == torch::kUInt8, "dq_scales: uint8 CPU codes expected");
  TORCH_CHECK(scale_block > 0, "dq_scales: scale_block must be positive, got ", scale_block);
  const int64_t n = codes.numel();
  check_cpu(absmax2, "dq_scales", "absmax2");
  TORCH_CHECK(absmax2.is_floating_point(), "dq_scales: absmax2 must be floating point (fp32), got ", absmax2.scalar_type());
  TORCH_CHECK(absmax2.numel() >= ceil_div(n, scale_block), "dq_scales: ", n, " scale codes in groups of ",
              scale_block, " need ", ceil_div(n, scale_block), " values of absmax2 (the scales' scales), got ",
              absmax2.numel());
  check_cpu(offset, "dq_scales", "offset");
  TORCH_CHECK(offset.numel() == 1, "dq_scales: offset must be one value (the mean of the block scales), got ",
              offset.numel());
  check_cpu(dynamic_map, "dq_scales", "dynamic_map");
  TORCH_CHECK(dynamic_map.numel() == 256, "dq_scales: dynamic_map must hold the 256 entries of the 8-bit map, got ",
              dynamic_map.numel());
  auto out = torch::empty({n}, torch::dtype(torch::kFloat32));
  auto q = codes.contiguous();
  auto a2 = absmax2.contiguous().to(torch::kFloat32);
  auto map = dynamic_map.contiguous().to(torch::kFloat32);
  const float off = offset.item<float>();
  const uint8_t* pq = q.data_ptr<uint8_t>();
  const float* pa = a2.data_ptr<float>();
  const float* pm = map.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float product = pm[pq[b]] * pa[b / scale_block];
      po[b] = product + off;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dq_scales", &dq_scales, "block scales from double-quantized codes");
  m.def("nf4_pack", &nf4_pack, "NF4 codes, block absmax, and whether every value was finite");
  m.def("nf4_unpack", &nf4_unpack, "NF4 codes and block scales to a dense tensor");
}
