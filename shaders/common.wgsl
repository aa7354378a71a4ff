// Shared by every row-wise kernel family; prepended to each family's source.
//
// A batch is `rows` rows of `cols` contiguous f32. Each operand binding is a window of a buffer
// starting at an aligned offset; `base` holds, per operand, the element index inside its binding
// where row 0 begins. The grid is 2-D when the workgroup count exceeds the per-dimension limit;
// `grid_x` linearises it.
//
// Special values are decided by explicit bit tests rather than left to arithmetic, because WGSL
// lets implementations assume that no infinities or NaNs occur: a row holding NaN or +inf, or
// made of -inf only, becomes NaN; a -inf entry gets probability exactly 0.

struct Params {
    rows: u32,
    cols: u32,
    grid_x: u32,
    chunk: u32,  // split kernels: elements per chunk
    chunks: u32, // split kernels: chunks per row
    spin: u32,   // split rows in one pass: the most loads a chunk waits for its row
    extra: u32,  // one more op-specific word
    groups: u32, // workgroups of the dispatch (a 2-D grid may run more)
    base: array<vec4<u32>, 2>,
    words: vec4<u32>, // op-specific scalars (bit patterns)
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;
// Elements (or vec4s) each invocation keeps in registers, at most MAX_ITEMS per array; 0 streams
// the row from memory in each phase.
override ITEMS: u32 = 0u;
// Who works on one row: 0 one invocation, 1 one subgroup of SG invocations, 2 the workgroup.
override TEAM: u32 = 2u;
// The device's fixed subgroup size (TEAM = 1, and the first step of workgroup reductions); 1
// where subgroup operations are absent or their size varies.
override SG: u32 = 1u;
// Split rows' finishing pass: chunks in reverse order (`Tuning::split_reverse`).
override REVERSE: bool = false;

const MAX_WG: u32 = 256u;
// Streamed sums add SUM_BLOCK of a lane's terms at a time into the running total: the f32
// rounding error then grows with SUM_BLOCK + n / SUM_BLOCK terms instead of n (a whole row of
// thousands of columns in one invocation would otherwise miss the 1e-5 bounds). A split row's
// partials are summed so too, where a lane takes more than SUM_BLOCK of them (thousands of short
// chunks for a team of a few invocations).
const SUM_BLOCK: u32 = 32u;
const MAX_ITEMS: u32 = 16u;
const ABS_MASK: u32 = 0x7fffffffu;
const INF_BITS: u32 = 0x7f800000u;
const NEG_INF_BITS: u32 = 0xff800000u;
const NAN_BITS: u32 = 0x7fc00000u;

fn base(i: u32) -> u32 {
    return p.base[i / 4u][i % 4u];
}

// Non-finite constants are built from a uniform so that no compiler folds them into literals
// that some shading languages cannot express.
fn from_bits(bits: u32) -> f32 {
    return bitcast<f32>(bits | (p.spin & 0u));
}

fn pos_inf() -> f32 {
    return from_bits(INF_BITS);
}

fn neg_inf() -> f32 {
    return from_bits(NEG_INF_BITS);
}

fn quiet_nan() -> f32 {
    return from_bits(NAN_BITS);
}

fn is_neg_inf(x: f32) -> bool {
    return bitcast<u32>(x) == NEG_INF_BITS;
}

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & ABS_MASK) < INF_BITS;
}

// The value a row's maximum is taken over: NaN and +inf poison the row, so they count as +inf
// and the row maximum is then not finite.
fn max_key(x: f32) -> f32 {
    let bits = bitcast<u32>(x);
    let poison = (bits & ABS_MASK) >= INF_BITS && bits != NEG_INF_BITS;
    return select(x, pos_inf(), poison);
}

// exp(x - m) for a row whose maximum m is finite; exactly 0 for -inf entries.
fn exp_shifted(x: f32, m: f32) -> f32 {
    return select(exp(x - m), 0.0, is_neg_inf(x));
}

// Four-wide forms, for rows read and written as vec4 (rows of a multiple of 4 columns starting at
// a multiple of 16 bytes).
fn max_key4(x: vec4<f32>) -> vec4<f32> {
    let bits = bitcast<vec4<u32>>(x);
    let poison = (bits & vec4<u32>(ABS_MASK)) >= vec4<u32>(INF_BITS) & bits != vec4<u32>(NEG_INF_BITS);
    return select(x, vec4<f32>(pos_inf()), poison);
}

fn is_neg_inf4(x: vec4<f32>) -> vec4<bool> {
    return bitcast<vec4<u32>>(x) == vec4<u32>(NEG_INF_BITS);
}

fn exp_shifted4(x: vec4<f32>, m: f32) -> vec4<f32> {
    return select(exp(x - m), vec4<f32>(0.0), is_neg_inf4(x));
}

fn max_of(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

fn sum_of(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// vec4s a lane loads (or sums) as one block before folding them into its running statistics.
const BLOCK4: u32 = 8u;

// Which elements of vec4 `q` (elements 4q .. 4q + 3) lie in lo .. hi: the kernels over rows
// that are not a multiple of 4 columns read a row (a chunk) as the vec4s that hold any of its
// elements, and mask the others.
fn in_span4(q: u32, lo: u32, hi: u32) -> vec4<bool> {
    let e = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u);
    return (e >= vec4<u32>(lo)) & (e < vec4<u32>(hi));
}

// Chunk bounds of a split row in vec4s (the chunk size is a multiple of 4 for vec4 kernels).
fn chunk_bounds4(chunk_id: u32) -> vec2<u32> {
    return chunk_bounds(chunk_id) / 4u;
}

fn linear_group(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * p.grid_x;
}

// Chunk `chunk_id` of a split row: [start, end).
fn chunk_bounds(chunk_id: u32) -> vec2<u32> {
    let start = chunk_id * p.chunk;
    return vec2<u32>(start, min(start + p.chunk, p.cols));
}

// Workgroup reductions. Each subgroup first reduces its own values (with subgroup operations
// where the device has them and SG is its fixed size; SG = 1 otherwise), its first invocation
// writes the result, one barrier, then every invocation combines the ceil(WG / SG) partials
// itself: one barrier per reduction instead of log2(WG), which matters on software adapters where
// a barrier switches between all of the workgroup's invocation groups, and few shared-memory
// reads on GPUs. Subgroups tile the workgroup in order of local_invocation_index (a partial last
// subgroup included). The max and the vec4 sums use different arrays, and each is used at most
// once per workgroup between barriers, so no reduction's writes can race another's reads.

var<workgroup> red_max: array<f32, MAX_WG>;
var<workgroup> red_sum: array<vec4<f32>, MAX_WG>;

fn workgroup_max(v: f32, lid: u32) -> f32 {
    let s = subgroup_max(v);
    if (lid % SG == 0u) {
        red_max[lid / SG] = s;
    }
    workgroupBarrier();
    var m = red_max[0];
    for (var i = 1u; i < (WG + SG - 1u) / SG; i++) {
        m = max(m, red_max[i]);
    }
    return m;
}

fn workgroup_sum4(v: vec4<f32>, lid: u32) -> vec4<f32> {
    let s = subgroup_sum4(v);
    if (lid % SG == 0u) {
        red_sum[lid / SG] = s;
    }
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    for (var i = 0u; i < (WG + SG - 1u) / SG; i++) {
        total += red_sum[i];
    }
    return total;
}

// The team working on one row (or, in split kernels, on one chunk of a row): which row or chunk,
// this invocation's lane in the team, the team's size. Lane `l` handles columns l, l + size,
// l + 2 size, ... so a team's loads are contiguous.
struct Team {
    row: u32,
    lane: u32,
    size: u32,
}

fn team_of(wid: vec3<u32>, lid: u32) -> Team {
    let g = linear_group(wid);
    if (TEAM == 0u) {
        return Team(g * WG + lid, 0u, 1u);
    }
    if (TEAM == 1u) {
        // Subgroups tile a 1-D workgroup in order of local_invocation_index.
        return Team(g * (WG / SG) + lid / SG, lid % SG, SG);
    }
    return Team(g, lid, WG);
}

// The chunk of a split row a team works on: its index among all chunks of the batch (where its
// partial goes), its row, and its place in the row. Teams past the last chunk leave together.
struct Chunk {
    team: Team,
    index: u32,
    row: u32,
    within: u32,
}

fn chunk_of(wid: vec3<u32>, lid: u32) -> Chunk {
    var team = team_of(wid, lid);
    // REVERSE (finishing passes): the last chunk first, so that the chunks the partials pass
    // read last, the likeliest still in cache, are read again first.
    let n = p.rows * p.chunks;
    if (REVERSE && team.row < n) {
        team.row = n - 1u - team.row;
    }
    return Chunk(team, team.row, team.row / p.chunks, team.row % p.chunks);
}

// Reductions over a team. A team never straddles rows, and every member of a team reaches these
// calls (rows are guarded per team), so subgroup operations and barriers stay uniform.
fn team_max(v: f32, lid: u32) -> f32 {
    if (TEAM == 0u) {
        return v;
    }
    if (TEAM == 1u) {
        return subgroup_max(v);
    }
    return workgroup_max(v, lid);
}

fn team_sum4(v: vec4<f32>, lid: u32) -> vec4<f32> {
    if (TEAM == 0u) {
        return v;
    }
    if (TEAM == 1u) {
        return subgroup_sum4(v);
    }
    return workgroup_sum4(v, lid);
}

fn team_sum(v: f32, lid: u32) -> f32 {
    return team_sum4(vec4<f32>(v, 0.0, 0.0, 0.0), lid).x;
}

// Combines per-chunk statistics (max m_i, sum s_i of exp(x - m_i)) of a row into the row's:
// M = max m_i, S = sum s_i * exp(m_i - M). Chunks of -inf only (m_i = -inf, s_i = 0) add nothing.
fn rescale(m_i: f32, m: f32) -> f32 {
    return select(exp(m_i - m), 0.0, is_neg_inf(m_i));
}

// A value as a word of a buffer kept 0 between calls (tallies, sync words): never 0, the mark of
// a word not yet written (the bits inverted, every NaN first made the one quiet NaN, whose
// inverse is not 0).
fn word_of(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    return ~select(bits, NAN_BITS, (bits & ABS_MASK) > INF_BITS);
}

fn value_of(word: u32) -> f32 {
    return bitcast<f32>(~word);
}
