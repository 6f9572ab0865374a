#include "checks.h"

#include <sstream>

#include <ATen/ATen.h>

namespace flux_attention::checks {

namespace {

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "fp32";
    case at::kDouble: return "fp64";
    case at::kHalf: return "fp16";
    case at::kBFloat16: return "bf16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

}  // namespace

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream s;
  s << "[";
  // Only plain ints and std::strings go into the stream: c10's operator<< overloads (SymInt,
  // Device) live in libc10, and handing them this library's ostream crashed on a machine whose
  // compiler and libstdc++ differ from torch's (seen on the H200 image).
  for (int64_t i = 0; i < t.dim(); ++i) {
    const auto n = t.sym_size(i).maybe_as_int();
    s << (i ? ", " : "");
    if (n) {
      s << static_cast<long long>(*n);
    } else {
      s << "?";
    }
  }
  s << "] " << dtype_name(t.scalar_type()) << " " << t.device().str();
  return s.str();
}

flux::DataType kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  const bool on_cpu = t.device().is_cpu() || t.device().is_meta();
  switch (t.scalar_type()) {
    case at::kFloat: return flux::DataType::kFloat32;
    case at::kHalf: return flux::DataType::kFloat16;
    case at::kBFloat16: return flux::DataType::kBFloat16;
    case at::kDouble:
      FLUX_CHECK(on_cpu, op, name, " must be bf16, fp16 or fp32 on ", c10::DeviceTypeName(t.device().type(), true),
                 " (fp64 is supported on CPU only, for gradcheck); got ", describe(t));
      return flux::DataType::kFloat64;
    default:
      FLUX_CHECK(false, op, name, " must be bf16, fp16, fp32", on_cpu ? " or fp64" : "", "; got ",
                 describe(t));
  }
  return flux::DataType::kFloat32;
}

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  FLUX_CHECK(t.defined(), op, name, " must be a tensor; got an undefined tensor");
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  FLUX_CHECK(t.dim() == dim, op, name, " must have ", dim, " dimensions; got ", describe(t));
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  FLUX_CHECK(t.device() == ref.device(), op, name, " must be on the same device as ", ref_name,
             " (", ref.device().str(), "); got ", describe(t));
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  FLUX_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ", ref_name,
             " (", dtype_name(ref.scalar_type()), "); got ", describe(t));
}

void check_int32_vector(const char* op, const char* name, const at::Tensor& t, int64_t len,
                        const at::Tensor& device_ref) {
  FLUX_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt, op, name,
             " must be a 1-D int32 tensor; got ", describe(t));
  FLUX_CHECK(t.size(0) == len, op, name, " must have ", len, " entries; got ", describe(t));
  check_same_device(op, name, t, "q", device_ref);
}

void check_cu_seqlens_values(const char* op, const char* name, const at::Tensor& cu, int64_t total) {
  if (!cu.device().is_cpu()) return;
  const auto c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  const int64_t n = c.numel();
  FLUX_CHECK(n >= 1 && p[0] == 0, op, name, "[0] must be 0; got ", n ? p[0] : -1);
  for (int64_t i = 1; i < n; ++i) {
    FLUX_CHECK(p[i] >= p[i - 1], op, name, " must be non-decreasing; got ", name, "[", i - 1,
               "] = ", p[i - 1], " > ", name, "[", i, "] = ", p[i]);
  }
  FLUX_CHECK(p[n - 1] <= total, op, name, "[-1] = ", p[n - 1],
             " exceeds the number of rows of its tensor (", total, ")");
}

void check_head_dim(const char* op, const at::Tensor& q, int64_t head_dim) {
  if (q.device().is_cuda()) {
    const bool ok = head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128 ||
                    head_dim == 256;
    FLUX_CHECK(ok, op, "head_dim (q.size(-1)) must be one of 32, 64, 96, 128, 256 on CUDA; got ",
               head_dim);
  } else {
    FLUX_CHECK(head_dim >= 1 && head_dim <= 256, op,
               "head_dim (q.size(-1)) must be between 1 and 256; got ", head_dim);
  }
}

void check_pattern(const char* op, const flux::StreamingPattern& p) {
  FLUX_CHECK(p.block_size > 0, op, "block_size must be positive; got ", p.block_size);
  FLUX_CHECK(p.sink_tokens > 0, op, "sink_tokens must be positive; got ", p.sink_tokens);
  FLUX_CHECK(p.local_blocks > 0, op, "local_blocks must be positive; got ", p.local_blocks);
  FLUX_CHECK(p.sink_tokens % p.block_size == 0, op, "sink_tokens (", p.sink_tokens,
             ") must be a multiple of block_size (", p.block_size,
             "): the streaming pattern keeps whole sink blocks");
}

at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

at::Tensor vector_aligned_rows(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
            (t.size(-1) * elem) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = (t.stride(d) * elem) % 16 == 0;
  if (ok) return t;
  // A contiguous but misaligned view (e.g. offset by one element) needs a fresh allocation.
  return t.is_contiguous() ? t.clone() : t.contiguous();
}

}  // namespace flux_attention::checks
