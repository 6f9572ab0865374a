// Host-only checks of the layout algebra the sm90 attention backward relies on (no GPU needed:
// CuTe layouts and partitions are plain host arithmetic). Build and run with
//   scripts/check_sm90_bwd_layouts.sh
// Exit status 0 iff every check passes. What it checks, for bf16 and fp16 at head dims 64 and 128:
//   * reading the S^T / dP^T accumulator as the register A operand of dV / dK (acc_as_a_operand)
//     gives, element for element, the (key, query) coordinates CuTe's own A partition of the dK/dV
//     TiledMma assigns to that thread;
//   * in the dK / dV and dQ accumulators, elements 2k and 2k + 1 are (row, col) and (row, col + 1),
//     which the epilogue and the dQ postprocess store as one 32-bit pair;
//   * each thread's 2 key rows of S^T are the same for all its elements of mode 0.1 / MMA_M, which
//     the mask's per-key intervals assume; the rowcol view lists them in order;
//   * the transposed smem views address the same bytes as the tiles they transpose;
//   * every (thread, element) of the dQ accumulator maps to a distinct element of the tile.
#include <cstdio>
#include <set>
#include <utility>

#include "sm90/bwd_common.cuh"

using namespace cute;
using namespace flux::sm90::bwd;

static int g_failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      if (g_failures < 20) {                               \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
      ++g_failures;                                        \
    }                                                      \
  } while (0)

template <class Tr>
void check_traits(const char* name) {
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kHeadDim = Tr::kHeadDim;
  const int before = g_failures;
  typename Tr::TiledMmaSdP mma_sdp;
  typename Tr::TiledMmadKV mma_dkv;
  typename Tr::TiledMmadQ mma_dq;

  Tensor cS = make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{});  // (key, query)
  Tensor cKV = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor cdQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  std::set<std::pair<int, int>> dq_seen;
  for (int t = 0; t < Tr::kMmaThreads; ++t) {
    // S^T accumulator coordinates, and the same registers read as the A operand of dV / dK.
    Tensor tScS = mma_sdp.get_thread_slice(t).partition_C(cS);
    Tensor tAcS = make_tensor(tScS.data(), acc_as_a_operand(tScS.layout()));
    Tensor tAcA = mma_dkv.get_thread_slice(t).partition_A(cS);  // CuTe's (key, query) per A slot
    CHECK(size(tAcS) == size(tAcA), "%s: A fragment sizes %d vs %d", name, int(size(tAcS)),
          int(size(tAcA)));
    CHECK(size<2>(tAcS) == size<2>(tAcA), "%s: A fragment k blocks", name);
    for (int i = 0; i < size(tAcA); ++i) {
      CHECK(tAcS(i) == tAcA(i), "%s thr %d A slot %d: acc (%d,%d) vs A (%d,%d)", name, t, i,
            int(get<0>(tAcS(i))), int(get<1>(tAcS(i))), int(get<0>(tAcA(i))), int(get<1>(tAcA(i))));
    }
    // Per-thread key rows: two, in the rowcol view, constant along columns.
    Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    CHECK(size<0>(rc) == 2, "%s: rows per thread", name);
    for (int mi = 0; mi < size<0>(rc); ++mi) {
      for (int ni = 0; ni < size<1>(rc); ++ni) {
        CHECK(get<0>(rc(mi, ni)) == get<0>(rc(mi, 0)), "%s: key of row %d varies", name, mi);
        CHECK(get<1>(rc(mi, ni)) == get<1>(rc(0, ni)), "%s: query of column %d varies", name, ni);
        // bwd_consumer.cuh's col_q / RowStats: column ni is query q_base + 8 (ni / 2) + ni % 2.
        CHECK(get<1>(rc(mi, ni)) == get<1>(rc(0, 0)) + 8 * (ni / 2) + ni % 2,
              "%s: column %d of thread %d is not q_base + 8 (ni / 2) + ni %% 2", name, ni, t);
      }
    }
    // Pairs of adjacent columns in the dK/dV and dQ accumulators.
    Tensor tKV = mma_dkv.get_thread_slice(t).partition_C(cKV);
    for (int i = 0; i + 1 < size(tKV); i += 2) {
      CHECK(get<0>(tKV(i + 1)) == get<0>(tKV(i)) && get<1>(tKV(i + 1)) == get<1>(tKV(i)) + 1,
            "%s: dKV pair %d of thread %d not adjacent", name, i, t);
      CHECK(get<1>(tKV(i)) % 2 == 0, "%s: dKV pair not 4-byte aligned", name);
    }
    Tensor tQ = mma_dq.get_thread_slice(t).partition_C(cdQ);
    CHECK(size(tQ) == Tr::kdQPerThread, "%s: dQ fragment size", name);
    for (int i = 0; i < size(tQ); ++i) {
      dq_seen.insert({int(get<0>(tQ(i))), int(get<1>(tQ(i)))});
      if (i % 2 == 0) {
        CHECK(get<0>(tQ(i + 1)) == get<0>(tQ(i)) && get<1>(tQ(i + 1)) == get<1>(tQ(i)) + 1,
              "%s: dQ pair %d of thread %d not adjacent", name, i, t);
      }
    }
    // Consumer WG w owns keys [64 w, 64 w + 64) of S^T and of dK / dV (same split).
    const int wg = t / 128;
    for (int i = 0; i < size(tScS); ++i) {
      CHECK(get<0>(tScS(i)) / 64 == wg, "%s: S^T key outside the WG's half", name);
    }
    for (int i = 0; i < size(tKV); ++i) {
      CHECK(get<0>(tKV(i)) / 64 == wg, "%s: dKV key outside the WG's half", name);
    }
  }
  CHECK(int(dq_seen.size()) == kBlockM * kHeadDim, "%s: dQ covers %d of %d elements", name,
        int(dq_seen.size()), kBlockM * kHeadDim);

  // Transposed smem views.
  typename Tr::SmemLayoutQ lq;
  typename Tr::SmemLayoutQt lqt;
  typename Tr::SmemLayoutK lk;
  typename Tr::SmemLayoutKt lkt;
  typename Tr::SmemLayoutdS lds;
  typename Tr::SmemLayoutdSt ldst;
  for (int s = 0; s < Tr::kStages; ++s) {
    for (int m = 0; m < kBlockM; ++m) {
      for (int d = 0; d < kHeadDim; ++d) CHECK(lq(m, d, s) == lqt(d, m, s), "%s: Qt view", name);
      for (int n = 0; n < kBlockN; ++n) CHECK(lds(m, n, s) == ldst(n, m, s), "%s: dSt view", name);
    }
  }
  for (int n = 0; n < kBlockN; ++n) {
    for (int d = 0; d < kHeadDim; ++d) CHECK(lk(n, d) == lkt(d, n), "%s: Kt view", name);
  }
  std::printf("%-10s kBlockM %3d  kBlockN %3d  smem %6zu B  %s\n", name, kBlockM, kBlockN,
              Tr::kSmemBytes, g_failures == before ? "ok" : "FAILED");
}

int main() {
  check_traits<BwdTraits<flux::DataType::kBFloat16, 64>>("bf16 hd64");
  check_traits<BwdTraits<flux::DataType::kBFloat16, 128>>("bf16 hd128");
  check_traits<BwdTraits<flux::DataType::kFloat16, 64>>("fp16 hd64");
  check_traits<BwdTraits<flux::DataType::kFloat16, 128>>("fp16 hd128");
  std::printf(g_failures == 0 ? "sm90 bwd layouts: PASS\n" : "sm90 bwd layouts: FAIL (%d)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
