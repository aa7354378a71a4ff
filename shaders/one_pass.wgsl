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
//
// With ALONE (`Tuning::split_alone`) there is no second pass. A chunk's done word is then its
// state: a chunk that saw its row complete sets WROTE and writes itself unless the row's last
// chunk has TAKEN it first; one that stopped waiting sets GAVE_UP. The chunk that completed the
// row's count waits (at most p.spin loads an invocation) until every chunk has set its state, takes
// the chunks that did not write themselves, marks them OWNED, and works them out one after
// another, as split_rest4 does. Whichever of WROTE and TAKEN reaches a state word first wins, so
// each chunk is written once. Every workgroup then counts itself out of the row's words (a second
// count), and the last out sets them back to 0.

override ALONE: bool = false;

const WROTE: u32 = 1u;
const GAVE_UP: u32 = 2u;
const TAKEN: u32 = 4u;
const OWNED: u32 = 8u;

var<workgroup> sync_flag: u32;
// ALONE: whether this workgroup's chunk completed its row's count.
var<workgroup> sync_last: u32;

// The sync words of a row: SYNC_WORDS per chunk, the count, and the count out (ALONE).
fn row_words() -> u32 {
    return SYNC_WORDS * p.chunks + 2u;
}

// The first sync word of `row`.
fn sync_row(row: u32) -> u32 {
    return row * row_words();
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
        let arrived = atomicAdd(&zeroed[count], 1u) + 1u;
        var seen = arrived;
        for (var i = 0u; i < spin && seen < p.chunks; i++) {
            seen = atomicLoad(&zeroed[count]);
        }
        if (ALONE) {
            // The chunk is this workgroup's to write unless the row's last chunk took it.
            let state = done_word(ch.row, ch.within);
            var mine = false;
            if (seen >= p.chunks) {
                mine = (atomicOr(&zeroed[state], WROTE) & TAKEN) == 0u;
            } else {
                atomicOr(&zeroed[state], GAVE_UP);
            }
            seen = select(0u, p.chunks, mine);
            sync_last = u32(arrived == p.chunks);
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
    let wrote = fused_chunk(ch, lid, p.spin, true);
    if (!ALONE) {
        if (wrote && lid == 0u) {
            atomicStore(&zeroed[done_word(ch.row, ch.within)], 1u);
        }
        return;
    }
    if (workgroupUniformLoad(&sync_last) != 0u) {
        finish_row(ch.row, lid);
    }
    leave_row(ch.row, lid);
}

// ALONE, by the workgroup whose chunk completed `row`'s count: waits for every chunk's state,
// takes those that did not write themselves and works them out.
fn finish_row(row: u32, lid: u32) {
    var budget = p.spin;
    var taken = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        let state = done_word(row, i);
        var word = atomicLoad(&zeroed[state]);
        while (word == 0u && budget > 0u) {
            budget -= 1u;
            word = atomicLoad(&zeroed[state]);
        }
        if ((atomicOr(&zeroed[state], TAKEN) & WROTE) == 0u) {
            atomicOr(&zeroed[state], OWNED);
            taken = 1.0;
        }
    }
    if (workgroup_max(taken, lid) > 0.0) {
        work_out_chunks(row, lid, OWNED, OWNED);
    }
}

// Works out, one after another, the chunks of `row` whose state word has `mask` equal to `want`.
fn work_out_chunks(row: u32, lid: u32, mask: u32, want: u32) {
    for (var k = 0u; k < p.chunks; k++) {
        workgroupBarrier();
        if (lid == 0u) {
            sync_flag = atomicLoad(&zeroed[done_word(row, k)]);
        }
        if ((workgroupUniformLoad(&sync_flag) & mask) == want) {
            let index = row * p.chunks + k;
            _ = fused_chunk(Chunk(Team(index, lid, WG), index, row, k), lid, 0u, false);
        }
    }
}

// ALONE: counts the workgroup out of `row`'s words; the last out sets them back to 0.
fn leave_row(row: u32, lid: u32) {
    let first = sync_row(row);
    workgroupBarrier();
    if (lid == 0u) {
        sync_flag = atomicAdd(&zeroed[first + row_words() - 1u], 1u) + 1u;
    }
    if (workgroupUniformLoad(&sync_flag) == p.chunks) {
        clear_row(row, lid);
    }
}

// Sets `row`'s sync words back to 0.
fn clear_row(row: u32, lid: u32) {
    let first = sync_row(row);
    for (var i = lid; i < row_words(); i += WG) {
        atomicStore(&zeroed[first + i], 0u);
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
        work_out_chunks(row, lid, WROTE, 0u);
    }
    workgroupBarrier();
    clear_row(row, lid);
}
