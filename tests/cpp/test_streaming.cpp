// flux/streaming.h against brute force. The reference below restates the rule of DESIGN.md section 1
// (and params.h) element by element, with none of the header's interval arithmetic, and every view the
// kernels use (row intervals, tile classes, key ranges, column view) is checked against it over many
// random small configurations: block sizes 1..8, Lq != Lk in both directions, causal, non-causal and
// streaming, empty sequences included.
#include <algorithm>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "catch_compat.h"
#include "flux/streaming.h"
#include "flux/tile_mask_plan.h"

namespace {

struct Config {
  int64_t lq = 0;
  int64_t lk = 0;
  bool causal = false;
  bool streaming = false;
  int64_t sink = 0;
  int64_t local_blocks = 1;
  int64_t block = 1;

  flux::RowRule rule() const {
    flux::StreamingPattern p;
    p.sink_tokens = static_cast<int>(sink);
    p.local_blocks = static_cast<int>(local_blocks);
    p.block_size = static_cast<int>(block);
    return flux::make_row_rule(lq, lk, causal, streaming, p);
  }

  std::string str() const {
    std::ostringstream s;
    s << "Lq=" << lq << " Lk=" << lk << (streaming ? " streaming" : causal ? " causal" : " dense")
      << " sink=" << sink << " local_blocks=" << local_blocks << " block=" << block;
    return s.str();
  }
};

// DESIGN.md section 1: a query at key position t = i + Lk - Lq (bottom-right causal alignment) sees
// keys j <= t; the streaming pattern keeps j < sink_tokens or block(j) >= block(t) - (local_blocks - 1).
bool reference_visible(const Config& c, int64_t i, int64_t j) {
  if (i < 0 || i >= c.lq || j < 0 || j >= c.lk) return false;
  if (!c.causal && !c.streaming) return true;
  const int64_t t = i + c.lk - c.lq;
  if (j > t) return false;  // also covers t < 0: such rows see nothing
  if (!c.streaming) return true;
  if (j < c.sink) return true;
  return j / c.block >= t / c.block - (c.local_blocks - 1);  // 0 <= j <= t: plain division is floor
}

// Dense visibility matrix of one config, row-major [lq][lk].
std::vector<char> reference_matrix(const Config& c) {
  std::vector<char> m(static_cast<size_t>(c.lq * c.lk));
  for (int64_t i = 0; i < c.lq; ++i)
    for (int64_t j = 0; j < c.lk; ++j) m[i * c.lk + j] = reference_visible(c, i, j);
  return m;
}

// Small random configs. Sink sizes are whole blocks, as the op layer requires (checks.h); a few
// configs also use a sink that is not a multiple of the block, which streaming.h's rule handles too.
Config random_config(std::mt19937_64& rng) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Config c;
  const int64_t blocks[] = {1, 2, 3, 4, 5, 8};
  c.block = blocks[uni(0, 5)];
  c.local_blocks = uni(1, 4);
  c.sink = uni(4, 9) == 4 ? uni(1, 3 * c.block) : c.block * uni(1, 3);
  const int64_t mode = uni(0, 2);
  c.causal = mode >= 1;
  c.streaming = mode == 2;
  c.lk = uni(0, 48);
  switch (uni(0, 3)) {
    case 0: c.lq = c.lk; break;         // prefill
    case 1: c.lq = uni(0, 1); break;    // decode (one row) or empty
    default: c.lq = uni(0, 48); break;  // Lq != Lk either way round
  }
  return c;
}

constexpr int kConfigsPerSeed = 25;

}  // namespace

TEST_CASE("the reference rule reproduces DESIGN.md's worked numbers", "[streaming]") {
  // Default pattern, decode of token t = 5000 (block 39): sink block 0 plus blocks 24..39, the last
  // one holding keys 4992..5000: 128 + 15 * 128 + 9 = 2057 keys.
  Config c;
  c.lq = 1;
  c.lk = 5001;
  c.streaming = true;
  c.causal = true;
  c.sink = 128;
  c.local_blocks = 16;
  c.block = 128;
  int64_t count = 0;
  for (int64_t j = 0; j < c.lk; ++j) count += reference_visible(c, 0, j);
  CHECK(count == 2057);
  CHECK(reference_visible(c, 0, 127));
  CHECK_FALSE(reference_visible(c, 0, 128));
  CHECK_FALSE(reference_visible(c, 0, 24 * 128 - 1));
  CHECK(reference_visible(c, 0, 24 * 128));
  const flux::RowRule r = c.rule();
  CHECK(flux::row_visible_count(r, 0) == 2057);
  CHECK(flux::row_sink_end(r, 0) == 128);
  CHECK(flux::row_local_start(r, 0) == 24 * 128);
  CHECK(flux::row_key_end(r, 0) == 5001);
}

TEST_CASE("is_visible and row_visible_count match the rule element by element", "[streaming]") {
  const int seed = GENERATE(range(0, 40));
  std::mt19937_64 rng(1000 + seed);
  int64_t checked = 0;
  for (int n = 0; n < kConfigsPerSeed; ++n) {
    const Config c = random_config(rng);
    const flux::RowRule r = c.rule();
    for (int64_t i = 0; i < c.lq; ++i) {
      int64_t count = 0;
      for (int64_t j = -2; j < c.lk + 2; ++j) {
        const bool want = reference_visible(c, i, j);
        count += want;
        if (flux::is_visible(r, i, j) != want) {
          INFO(c.str() << " row " << i << " key " << j << " reference " << want);
          FAIL("is_visible disagrees with the rule");
        }
        ++checked;
      }
      if (flux::row_visible_count(r, i) != count) {
        INFO(c.str() << " row " << i << " reference count " << count << " header "
                     << flux::row_visible_count(r, i));
        FAIL("row_visible_count disagrees with the rule");
      }
    }
  }
  REQUIRE(checked > 0);
}

TEST_CASE("row interval ends are non-decreasing in the row", "[streaming]") {
  // classify_tile and key_ranges_for_rows read only the first and last row of a tile; that is only
  // sound because these three ends never decrease.
  const int seed = GENERATE(range(0, 20));
  std::mt19937_64 rng(2000 + seed);
  int64_t checked = 0;
  for (int n = 0; n < kConfigsPerSeed; ++n) {
    const Config c = random_config(rng);
    const flux::RowRule r = c.rule();
    for (int64_t i = 1; i < c.lq; ++i) {
      const bool ok = flux::row_key_end(r, i) >= flux::row_key_end(r, i - 1) &&
                      flux::row_sink_end(r, i) >= flux::row_sink_end(r, i - 1) &&
                      flux::row_local_start(r, i) >= flux::row_local_start(r, i - 1);
      if (!ok) {
        INFO(c.str() << " rows " << i - 1 << ", " << i);
        FAIL("an interval end decreased");
      }
      ++checked;
    }
  }
  REQUIRE(checked > 0);
}

namespace {

struct TileTruth {
  bool any = false;
  bool all = true;
};

TileTruth tile_truth(const Config& c, const std::vector<char>& m, int64_t i0, int64_t i1, int64_t j0,
                     int64_t j1) {
  TileTruth t;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = j0; j < j1; ++j) {
      // Keys past Lk do not exist: a tile hanging over the end is never fully visible.
      const bool v = j < c.lk && m[i * c.lk + j];
      t.any = t.any || v;
      t.all = t.all && v;
    }
  return t;
}

// Checks one tile; returns false (after recording why) on a violation.
bool check_tile(const Config& c, const std::vector<char>& m, int64_t i0, int64_t i1, int64_t j0,
                int64_t j1) {
  const flux::TileKind kind = flux::classify_tile(c.rule(), i0, i1, j0, j1);
  const TileTruth t = tile_truth(c, m, i0, i1, j0, j1);
  const char* what = nullptr;
  if (kind == flux::TileKind::kSkip && t.any) what = "kSkip for a tile with a visible element";
  if (kind == flux::TileKind::kFull && !t.all) what = "kFull for a tile with an invisible element";
  // The header promises exact skip answers (the union of the rows' key sets is computed exactly),
  // so a tile with nothing visible must not cost a masked pass either.
  if (kind != flux::TileKind::kSkip && !t.any) what = "not kSkip for a tile with nothing visible";
  if (what == nullptr) return true;
  UNSCOPED_INFO(c.str() << " rows [" << i0 << ", " << i1 << ") keys [" << j0 << ", " << j1
                        << ") kind " << static_cast<int>(kind) << ": " << what);
  return false;
}

}  // namespace

TEST_CASE("classify_tile is safe on kernel tilings and on arbitrary rectangles", "[streaming]") {
  const int seed = GENERATE(range(0, 40));
  std::mt19937_64 rng(3000 + seed);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int64_t checked = 0;
  for (int n = 0; n < kConfigsPerSeed; ++n) {
    const Config c = random_config(rng);
    if (c.lq == 0 || c.lk == 0) continue;
    const std::vector<char> m = reference_matrix(c);
    // Tilings as kernels walk them: tiles of (tm, tn), the last ones cut at Lq and hanging over Lk
    // (a kernel's key tile may extend past the sequence; the header is asked about whole tiles).
    for (int64_t tm : {int64_t(1), int64_t(2), int64_t(3), c.block, 2 * c.block}) {
      for (int64_t tn : {int64_t(1), int64_t(4), c.block, 2 * c.block}) {
        for (int64_t i0 = 0; i0 < c.lq; i0 += tm) {
          for (int64_t j0 = 0; j0 < c.lk; j0 += tn) {
            if (!check_tile(c, m, i0, std::min(i0 + tm, c.lq), j0, j0 + tn)) FAIL("classify_tile");
            ++checked;
          }
        }
      }
    }
    for (int k = 0; k < 60; ++k) {
      const int64_t i0 = uni(0, c.lq - 1), i1 = uni(i0 + 1, c.lq);
      const int64_t j0 = uni(0, c.lk - 1), j1 = uni(j0 + 1, c.lk);
      if (!check_tile(c, m, i0, i1, j0, j1)) FAIL("classify_tile");
      ++checked;
    }
  }
  REQUIRE(checked > 0);
}

TEST_CASE("tile_mask_plan marks exactly the tiles a key loop must mask", "[streaming]") {
  // The kernels' question per key tile n of a row range: is it the ragged last tile (j0 + tn > Lk), or
  // a tile classify_tile does not call kFull (cut at Lk, as the kernels cut it)? The plan must give
  // the same answer for every tile, including the tiles a wider range visits that these rows skip,
  // and for empty row ranges (only the ragged tile).
  const int seed = GENERATE(range(0, 40));
  std::mt19937_64 rng(7000 + seed);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int64_t checked = 0, masked = 0;
  for (int n = 0; n < kConfigsPerSeed; ++n) {
    const Config c = random_config(rng);
    if (c.lk == 0) continue;
    const flux::RowRule r = c.rule();
    const std::vector<char> m = reference_matrix(c);
    std::vector<std::pair<int64_t, int64_t>> row_ranges = {{c.lq, c.lq}};  // rows past the sequence
    for (int64_t tm : {int64_t(1), int64_t(2), int64_t(3), c.block, 2 * c.block})
      for (int64_t i0 = 0; i0 < c.lq; i0 += tm) row_ranges.emplace_back(i0, std::min(i0 + tm, c.lq));
    for (int k = 0; k < 20 && c.lq > 0; ++k) {
      const int64_t i0 = uni(0, c.lq - 1);
      row_ranges.emplace_back(i0, uni(i0 + 1, c.lq));
    }
    for (int64_t tn : {int64_t(1), int64_t(3), int64_t(4), c.block, 2 * c.block}) {
      for (const auto& [i0, i1] : row_ranges) {
        const flux::TileMaskPlan plan = flux::tile_mask_plan(r, i0, i1, tn);
        for (int64_t t = 0; t * tn < c.lk; ++t) {
          const int64_t j0 = t * tn, j1 = std::min(j0 + tn, c.lk);
          const bool ragged = j0 + tn > c.lk;
          const bool want = i0 >= i1 ? ragged
                                     : ragged || flux::classify_tile(r, i0, i1, j0, j1) != flux::TileKind::kFull;
          if (plan.needs_mask(t) != want) {
            INFO(c.str() << " rows [" << i0 << ", " << i1 << ") tile " << t << " of " << tn << " keys: plan "
                         << plan.needs_mask(t) << " (mask_from " << plan.mask_from << ", band [" << plan.band_lo
                         << ", " << plan.band_hi << ")), classify says " << want);
            FAIL("tile_mask_plan disagrees with classify_tile");
          }
          // An unmasked tile's rows see every key of it (the element rule, not the header).
          if (!want && i0 < i1) {
            const TileTruth tt = tile_truth(c, m, i0, i1, j0, j1);
            if (!tt.all) {
              INFO(c.str() << " rows [" << i0 << ", " << i1 << ") tile " << t << " of " << tn << " keys");
              FAIL("an unmasked tile holds an invisible element");
            }
          }
          ++checked;
          masked += want;
        }
      }
    }
  }
  REQUIRE(checked > 0);
  REQUIRE(masked > 0);
}

TEST_CASE("key_ranges_for_rows covers every visible key of its rows", "[streaming]") {
  const int seed = GENERATE(range(0, 40));
  std::mt19937_64 rng(4000 + seed);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int64_t checked = 0;
  for (int n = 0; n < kConfigsPerSeed; ++n) {
    const Config c = random_config(rng);
    if (c.lq == 0) continue;
    const flux::RowRule r = c.rule();
    for (int k = 0; k < 40; ++k) {
      const int64_t i0 = uni(0, c.lq - 1), i1 = uni(i0 + 1, c.lq);
      const flux::KeyRanges kr = flux::key_ranges_for_rows(r, i0, i1);
      INFO(c.str() << " rows [" << i0 << ", " << i1 << ") -> [0, " << kr.a_end << ") + ["
                   << kr.b_start << ", " << kr.b_end << ")");
      // Two disjoint intervals in increasing order, inside [0, Lk].
      const bool shape_ok = kr.a_end >= 0 && kr.b_start <= kr.b_end && kr.b_end <= c.lk &&
                            (kr.a_end == 0 || kr.a_end < kr.b_start);
      if (!shape_ok) FAIL("key ranges out of order or out of bounds");
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < c.lk; ++j) {
          if (!reference_visible(c, i, j)) continue;
          const bool covered = j < kr.a_end || (j >= kr.b_start && j < kr.b_end);
          if (!covered) {
            INFO("row " << i << " sees key " << j);
            FAIL("visible key outside the ranges");
          }
          ++checked;
        }
    }
  }
  REQUIRE(checked > 0);
}

TEST_CASE("rows_for_keys covers every row that sees a key of the range", "[streaming]") {
  const int seed = GENERATE(range(0, 40));
  std::mt19937_64 rng(5000 + seed);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int64_t checked = 0;
  for (int n = 0; n < kConfigsPerSeed; ++n) {
    const Config c = random_config(rng);
    if (c.lk == 0) continue;
    const flux::RowRule r = c.rule();
    std::vector<std::pair<int64_t, int64_t>> ranges;
    for (int64_t j0 = 0; j0 < c.lk; j0 += c.block) ranges.emplace_back(j0, std::min(j0 + c.block, c.lk));
    for (int k = 0; k < 40; ++k) {
      const int64_t j0 = uni(0, c.lk - 1);
      ranges.emplace_back(j0, uni(j0 + 1, c.lk));
    }
    for (const auto& [j0, j1] : ranges) {
      const flux::RowRange rr = flux::rows_for_keys(r, j0, j1);
      INFO(c.str() << " keys [" << j0 << ", " << j1 << ") -> rows [" << rr.lo << ", " << rr.hi << ")");
      if (rr.lo < 0 || rr.hi > c.lq) FAIL("row range outside [0, Lq]");
      for (int64_t i = 0; i < c.lq; ++i) {
        bool sees = false;
        for (int64_t j = j0; j < j1 && !sees; ++j) sees = reference_visible(c, i, j);
        if (sees && (i < rr.lo || i >= rr.hi)) {
          INFO("row " << i);
          FAIL("a row that sees the keys is outside the row range");
        }
        checked += sees;
      }
    }
  }
  REQUIRE(checked > 0);
}

TEST_CASE("the default pattern at the lengths around its edges", "[streaming]") {
  // 128 sink tokens + 16 local blocks of 128, at L in {1, 127, 128, 129, sink + window - 1,
  // sink + window, sink + window + 1, 17 * 128 + 1}, square and with Lq != Lk, on 128 x 128 tiles.
  const int64_t lq = GENERATE(int64_t(1), int64_t(127), int64_t(128), int64_t(129), int64_t(2175),
                              int64_t(2176), int64_t(2177), int64_t(2177 + 128));
  const int64_t extra_k = GENERATE(int64_t(0), int64_t(77));
  Config c;
  c.lq = lq;
  c.lk = lq + extra_k;
  c.streaming = true;
  c.causal = true;
  c.sink = 128;
  c.local_blocks = 16;
  c.block = 128;
  const flux::RowRule r = c.rule();
  const std::vector<char> m = reference_matrix(c);
  for (int64_t i = 0; i < c.lq; ++i) {
    int64_t count = 0;
    for (int64_t j = 0; j < c.lk; ++j) count += m[i * c.lk + j];
    if (flux::row_visible_count(r, i) != count) {
      INFO(c.str() << " row " << i << " reference " << count);
      FAIL("row_visible_count");
    }
  }
  for (int64_t tm : {int64_t(64), int64_t(128)}) {
    for (int64_t i0 = 0; i0 < c.lq; i0 += tm) {
      const int64_t i1 = std::min(i0 + tm, c.lq);
      for (int64_t j0 = 0; j0 < c.lk; j0 += 128) {
        if (!check_tile(c, m, i0, i1, j0, j0 + 128)) FAIL("classify_tile");
      }
      const flux::KeyRanges kr = flux::key_ranges_for_rows(r, i0, i1);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j < c.lk; ++j)
          if (m[i * c.lk + j] && !(j < kr.a_end || (j >= kr.b_start && j < kr.b_end))) {
            INFO(c.str() << " row " << i << " key " << j);
            FAIL("key_ranges_for_rows misses a visible key");
          }
    }
  }
  SUCCEED(c.str());
}
