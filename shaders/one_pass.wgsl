// Split rows in one pass over the input, where the device runs a row's chunks at the same time
// (`Tuning::split_wait`, `loss_split_wait`, `backward_split_wait`). Prepended, after
// common.wgsl, to the families that have it, which declare:
//
// - `zeroed`, their words kept 0 between calls: per row, per chunk its partial (SYNC_WORDS - 1
//   words, each `word_of` a statistic: never 0, the mark of a word not yet written) and whether
//   it is done, then how many chunks have stored their partial;
// - SYNC_WORDS;
// - `fused_chunk(ch, lid, spin, publish) -> bool`, which works out one chunk of a row held in
//   registers: in the one pass (`publish`) it hands its partial to `arrive` and returns false if
//   the row's other chunks did not all come within `spin` loads; otherwise it combines the row's
//   partials, writes the chunk's output from registers and returns true.
//
// split_fused4 runs a workgroup per chunk, and marks the chunks it wrote done. Nothing promises
// that a row's workgroups run at once, so the wait is bounded: split_rest4, a workgroup per row,
// works out the chunks left (reading their input again, and only theirs) and sets the row's words
// back to 0. Both passes work out a chunk and combine a row's partials the same way (chunk i
// goes to invocation i % WG), so the output does not depend on which pass wrote it.

override SPIN: u32 = 0u;

var<workgroup> sync_flag: u32;

// The first sync word of `row`; the count follows the chunks' words.
fn sync_row(row: u32) -> u32 {
    return row * (SYNC_WORDS * p.chunks + 1u);
}

// The statistic in word `at`, which its writer has stored: a store not yet visible is loaded
// again.
fn stored_value(at: u32) -> f32 {
    var word = atomicLoad(&zeroed[at]);
    while (word == 0u) {
        word = atomicLoad(&zeroed[at]);
    }
    return value_of(word);
}

// The partial of chunk i of `row` (its first SYNC_WORDS - 1 components; the rest 0), all of whose
// words have been stored.
fn stored_partial(row: u32, i: u32) -> vec4<f32> {
    let at = sync_row(row) + SYNC_WORDS * i;
    var part = vec4<f32>(0.0);
    for (var k = 0u; k + 1u < SYNC_WORDS; k++) {
        part[k] = stored_value(at + k);
    }
    return part;
}

// The largest first component of `row`'s partials (its max, where the partial starts with one),
// over the workgroup, in uniform control flow; chunk i goes to invocation i % WG.
fn synced_max(row: u32, lid: u32) -> f32 {
    var m = neg_inf();
    for (var i = lid; i < p.chunks; i += WG) {
        m = max(m, stored_value(sync_row(row) + SYNC_WORDS * i));
    }
    return workgroup_max(m, lid);
}

// Stores chunk `ch`'s partial (its first SYNC_WORDS - 1 components), counts the chunk in, then
// waits, at most `spin` loads, for the count to reach the row's chunks (one invocation polls).
// Returns whether it has. Called by the whole workgroup in uniform control flow.
fn arrive(ch: Chunk, lid: u32, spin: u32, partial: vec4<f32>) -> bool {
    if (lid == 0u) {
        let at = sync_row(ch.row) + SYNC_WORDS * ch.within;
        for (var k = 0u; k + 1u < SYNC_WORDS; k++) {
            atomicStore(&zeroed[at + k], word_of(partial[k]));
        }
        let count = sync_row(ch.row) + SYNC_WORDS * p.chunks;
        var seen = atomicAdd(&zeroed[count], 1u) + 1u;
        for (var i = 0u; i < spin && seen < p.chunks; i++) {
            seen = atomicLoad(&zeroed[count]);
        }
        sync_flag = seen;
    }
    return workgroupUniformLoad(&sync_flag) >= p.chunks;
}

// The done flag of chunk `within` of `row`.
fn done_word(row: u32, within: u32) -> u32 {
    return sync_row(row) + SYNC_WORDS * within + SYNC_WORDS - 1u;
}

@compute @workgroup_size(WG)
fn split_fused4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    if (fused_chunk(ch, lid, SPIN, true) && lid == 0u) {
        atomicStore(&zeroed[done_word(ch.row, ch.within)], 1u);
    }
}

// One workgroup per row: works out the chunks the one pass left (one after another; none where
// the row's chunks ran at once) and sets the row's words back to 0.
@compute @workgroup_size(WG)
fn split_rest4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = linear_group(wid);
    if (row >= p.rows) {
        return;
    }
    var left = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        left = max(left, select(1.0, 0.0, atomicLoad(&zeroed[done_word(row, i)]) != 0u));
    }
    if (workgroup_max(left, lid) > 0.0) {
        // Every partial is there: the one pass has run to its end.
        for (var k = 0u; k < p.chunks; k++) {
            workgroupBarrier();
            if (lid == 0u) {
                sync_flag = atomicLoad(&zeroed[done_word(row, k)]);
            }
            if (workgroupUniformLoad(&sync_flag) == 0u) {
                let index = row * p.chunks + k;
                _ = fused_chunk(Chunk(Team(index, lid, WG), index, row, k), lid, 0u, false);
            }
        }
    }
    workgroupBarrier();
    let first = sync_row(row);
    for (var i = lid; i < SYNC_WORDS * p.chunks + 1u; i += WG) {
        atomicStore(&zeroed[first + i], 0u);
    }
}
