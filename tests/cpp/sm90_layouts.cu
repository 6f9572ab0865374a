// Host-side checks of the layout facts the sm_90a forward kernel relies on (csrc/cuda/sm90/
// fwd_kernel.cuh), for every configuration it instantiates. Pure CuTe layout algebra: runs on any
// machine with nvcc, no GPU. Exit status 0 iff every check holds.
//
//  1. The fp32 accumulator of a 64 x N warpgroup MMA holds element i of thread t = 32 w + 4 g + q at
//     row 16 w + g + 8 ((i / 2) % 2), column 2 q + (i % 2) + 8 (i / 4) (RowSoftmax, mask_tile).
//  2. The A operand of the register-sourced P V product enumerates (row, column) in that same order
//     (convert_to_operand converts element-wise).
//  3. In the 128-byte swizzled shared-memory tiles, the 8 elements (r, 8c .. 8c + 7) are 16 contiguous,
//     16-byte aligned bytes, and the tile maps one-to-one into its slot (the 16-byte epilogue and
//     zero-fill copies address chunks through the swizzled tensor).
#include <cstdio>
#include <cstdint>
#include <set>
#include <vector>

#include "sm90/fwd_config.cuh"

using namespace cute;

static int g_failures = 0;

#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      if (g_failures++ < 20) {           \
        std::printf("FAILED %s: ", #cond); \
        std::printf(__VA_ARGS__);        \
        std::printf("\n");               \
      }                                  \
    }                                    \
  } while (0)

template <class Cfg>
void check_fragments(const char* name) {
  constexpr int N = Cfg::kBlockN, D = Cfg::kHeadDim;
  typename Cfg::TiledMmaQK mma_qk;
  typename Cfg::TiledMmaPV mma_pv;
  for (int t = 0; t < 128; ++t) {
    const int w = t / 32, g = (t % 32) / 4, q = t % 4;
    auto tScS = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<N>>{}));
    auto tOcP = mma_pv.get_thread_slice(t).partition_A(make_identity_tensor(Shape<_64, Int<N>>{}));
    auto tOcO = mma_pv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<D>>{}));
    CHECK(size(tScS) == N / 2 && size(tOcP) == N / 2 && size(tOcO) == D / 2, "%s: fragment sizes", name);
    for (int i = 0; i < size(tScS); ++i) {
      const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 2 * q + (i % 2) + 8 * (i / 4);
      CHECK(get<0>(tScS(i)) == row && get<1>(tScS(i)) == col, "%s: S t=%d i=%d at (%d,%d), expected (%d,%d)",
            name, t, i, int(get<0>(tScS(i))), int(get<1>(tScS(i))), row, col);
      CHECK(get<0>(tOcP(i)) == row && get<1>(tOcP(i)) == col, "%s: P operand t=%d i=%d at (%d,%d), expected (%d,%d)",
            name, t, i, int(get<0>(tOcP(i))), int(get<1>(tOcP(i))), row, col);
    }
    for (int i = 0; i < size(tOcO); ++i) {
      const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 2 * q + (i % 2) + 8 * (i / 4);
      CHECK(get<0>(tOcO(i)) == row && get<1>(tOcO(i)) == col, "%s: O t=%d i=%d", name, t, i);
    }
  }
}

template <class Cfg, class Layout2D>
void check_swizzled_tile(const char* name, int rows, Layout2D layout, size_t slot_elems) {
  using Element = typename Cfg::Element;
  constexpr int D = Cfg::kHeadDim;
  std::vector<Element> storage(slot_elems + 1024);
  Element* base = reinterpret_cast<Element*>((reinterpret_cast<uintptr_t>(storage.data()) + 1023) & ~uintptr_t(1023));
  Tensor s = make_tensor(make_smem_ptr(base), layout);
  std::set<const Element*> seen;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < D; c += 8) {
      const Element* chunk = &s(r, c);
      CHECK(reinterpret_cast<uintptr_t>(chunk) % 16 == 0, "%s: chunk (%d,%d) not 16-byte aligned", name, r, c);
      for (int e = 0; e < 8; ++e) {
        const Element* p = &s(r, c + e);
        CHECK(p == chunk + e, "%s: (%d,%d) not contiguous with its chunk", name, r, c + e);
        CHECK(p >= base && p < base + slot_elems, "%s: (%d,%d) outside the slot", name, r, c + e);
        seen.insert(p);
      }
    }
  }
  CHECK(seen.size() == size_t(rows) * D, "%s: %zu distinct addresses for %d elements", name, seen.size(), rows * D);
}

template <class Cfg>
void check_config(const char* name) {
  check_fragments<Cfg>(name);
  typename Cfg::SmemLayoutQ lq;
  check_swizzled_tile<Cfg>(name, Cfg::kBlockM, lq, cosize(lq));
  typename Cfg::SmemLayoutK lk;
  check_swizzled_tile<Cfg>(name, Cfg::kBlockN, lk(_, _, 0), cosize(lk));
  std::printf("%s: BLK_M %d BLK_N %d stages %d, %d threads, %d bytes of shared memory\n", name, Cfg::kBlockM,
              Cfg::kBlockN, Cfg::kStages, Cfg::kThreads, Cfg::kSmemBytes);
}

int main() {
  check_config<flux::sm90::FwdConfig<__nv_bfloat16, 128>>("bf16 hd128");
  check_config<flux::sm90::FwdConfig<__half, 128>>("fp16 hd128");
  check_config<flux::sm90::FwdConfig<__nv_bfloat16, 128, true, 176>>("bf16 hd128 176-key tiles");
  check_config<flux::sm90::FwdConfig<__half, 128, true, 176>>("fp16 hd128 176-key tiles");
  check_config<flux::sm90::FwdConfig<__nv_bfloat16, 64>>("bf16 hd64");
  check_config<flux::sm90::FwdConfig<__half, 64>>("fp16 hd64");
  std::printf(g_failures ? "sm90 layouts: %d FAILED checks\n" : "sm90 layouts: all checks passed\n", g_failures);
  return g_failures ? 1 : 0;
}
