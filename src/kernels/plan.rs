//! Which kernel runs a row-wise op, chosen by row length, row count and device.
//!
//! The table is data, [`Tuning`], so that benchmarks can override it. Two defaults exist because
//! the best kernel differs by an order of magnitude between GPUs and software rasterisers: on
//! lavapipe/llvmpipe a workgroup barrier switches between every group of SIMD lanes of the
//! workgroup, so barrier-free kernels (an invocation or a subgroup per row) win there, whereas a
//! GPU wants many invocations per row to hide memory latency.

/// The widest row ever given to a single invocation: one invocation summing a whole row in f32
/// loses accuracy past a few thousand terms.
pub const THREAD_MAX_COLS: u32 = 4096;

/// The loop iterations an invocation may run on llvmpipe/lavapipe (which stop it, silently, at
/// 65535), with room for the loops outside the main passes.
pub const SOFTWARE_LOOP_BUDGET: u64 = 60_000;

/// The most loads whose values an invocation keeps in registers in scalar kernels and in the
/// vec4 backward kernels (one array per operand in the shaders).
pub const MAX_ITEMS: u32 = 16;

/// The same for the vec4 softmax and cross-entropy kernels, which hold the row in two such
/// arrays.
pub const MAX_ITEMS_VEC4: u32 = 2 * MAX_ITEMS;

/// The most slots a tally has ([`Tuning::loss_tally`], [`Tuning::batch_tally`]): the workgroup
/// that finishes last reads them all, so a dispatch of more workgroups sums the other way (stored
/// partials, then their sum).
pub const TALLY_MAX_SLOTS: u32 = 1 << 16;

/// Who works on one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One invocation per row, no reductions between invocations.
    RowPerThread {
        /// Elements held in registers (0: the row is streamed from memory in each phase).
        items: u32,
    },
    /// One subgroup per row, reduced with subgroup operations: no barriers.
    RowPerSubgroup {
        /// Elements per invocation held in registers (0: streamed).
        items: u32,
    },
    /// One workgroup per row, reduced through workgroup memory.
    RowPerWorkgroup {
        /// Elements per invocation held in registers (0: streamed).
        items: u32,
    },
    /// Each row is split into chunks of `chunk` elements, one team per chunk.
    SplitRow {
        /// Elements per chunk.
        chunk: u32,
        /// One invocation per chunk (no barriers) rather than one workgroup.
        per_invocation: bool,
    },
}

impl std::fmt::Display for Strategy {
    /// E.g. `subgroup per row, 8 loads in registers` or `split in chunks of 4096, workgroup per
    /// chunk`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (team, items) = match *self {
            Strategy::RowPerThread { items } => ("invocation", items),
            Strategy::RowPerSubgroup { items } => ("subgroup", items),
            Strategy::RowPerWorkgroup { items } => ("workgroup", items),
            Strategy::SplitRow {
                chunk,
                per_invocation,
            } => {
                let team = if per_invocation {
                    "invocation"
                } else {
                    "workgroup"
                };
                return write!(f, "split in chunks of {chunk}, {team} per chunk");
            }
        };
        match items {
            0 => write!(f, "{team} per row, streamed"),
            1 => write!(f, "{team} per row, 1 load in registers"),
            n => write!(f, "{team} per row, {n} loads in registers"),
        }
    }
}

/// What the device offers that the choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// The subgroup size the kernels use: the device's, when it has subgroup operations and a
    /// fixed subgroup size and [`Tuning::subgroups`] allows them; `None` otherwise, and then no
    /// kernel uses a subgroup operation (reductions go through workgroup memory alone).
    pub subgroup_size: Option<u32>,
    /// The loop iterations one invocation may run (software adapters end longer ones).
    pub loop_budget: Option<u64>,
}

/// Thresholds and workgroup sizes of the kernel choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Workgroup size of the one-invocation-per-row kernel.
    pub thread_workgroup: u32,
    /// Rows of at most this many columns run one invocation per row.
    pub thread_max_cols: u32,
    /// The same bound on devices without (fixed-size) subgroups, where the alternative is a
    /// workgroup per row.
    pub thread_max_cols_without_subgroups: u32,
    /// Workgroup size of the one-subgroup-per-row kernel (a multiple of the subgroup size).
    pub subgroup_workgroup: u32,
    /// Rows of at most this many columns run one subgroup per row, where subgroups exist.
    pub subgroup_max_cols: u32,
    /// Rows loaded as vec4 that are too long for a subgroup to hold in registers (which it
    /// would stream) run one invocation per row instead, up to this many columns (at most
    /// 4096); 0: never. (Scalar loads stay with the subgroup, whose lanes read
    /// neighbouring elements.)
    pub streamed_thread_max_cols: u32,
    /// Workgroup size of the per-row and split kernels, and of one invocation per row where
    /// the invocation streams its row.
    pub row_workgroup: u32,
    /// The same on devices without (fixed-size) subgroups or with `subgroups` 0, in place of
    /// `row_workgroup`: their workgroup reductions take a barrier per halving.
    pub row_workgroup_without_subgroups: u32,
    /// The most loads an invocation keeps in registers (a power of two): vec4s on aligned rows,
    /// up to 32 (128 elements) in the softmax and cross-entropy kernels; scalar kernels and
    /// the vec4 backward kernels keep at most 16 (the backward kernels hold that many of each
    /// of their two operands).
    pub max_items: u32,
    /// Rows of at least this many columns are split across workgroups ...
    pub split_min_cols: u32,
    /// ... when the batch has fewer rows than this (otherwise one team per row already fills
    /// the device).
    pub split_max_rows: u32,
    /// Elements per chunk of a split row.
    pub split_chunk: u32,
    /// 1: rows that neither an invocation nor a subgroup takes run one workgroup per row; 0:
    /// they are split instead, whatever the row count (where a workgroup's barriers cost more
    /// than a second pass over the row).
    pub workgroup_per_row: u32,
    /// Who works on one chunk of a split row: 0 one invocation, otherwise one workgroup.
    pub split_team: u32,
    /// Who sums one block of rows in the first pass of a sum over the batch (the divisor of a
    /// mean, a reduced loss): 0 one invocation, each leaving its own partial for the second
    /// pass (no barrier); otherwise one workgroup, leaving one partial.
    pub batch_team: u32,
    /// 1: a sum over a batch of more than one block (and at most 65536 blocks) takes one pass,
    /// whose workgroups each leave their block's sum in a slot and take a ticket, the last one
    /// to finish adding the slots (no second dispatch; the blocks are summed by workgroups,
    /// whatever `batch_team` says); 0: two passes, as `batch_team` says.
    pub batch_tally: u32,
    /// The row kernels of a reduced cross-entropy add up the loss themselves, through a tally
    /// as `batch_tally` describes (a workgroup sum, then the workgroups' sums), where the call
    /// is one dispatch of them (one block of rows, not split) of at most this many workgroups
    /// (and at most 65536): no per-row losses are stored and no batch sum follows. Otherwise,
    /// and always with 0, the rows' losses are stored, then summed over the batch.
    pub loss_tally: u32,
    /// 1: the finishing pass of split rows takes the chunks last to first, so that its first
    /// reads find the input the partials pass read last still in cache; 0: in order.
    pub split_reverse: u32,
    /// Rows each invocation adds in a block of the first pass of a sum over the batch (the
    /// block is the workgroup size times this); a batch of one block takes the second pass
    /// alone. Fewer rows per invocation: shorter loops, more blocks.
    pub batch_rows: u32,
    /// Split rows run in groups of rows spanning at most this many bytes of input (at least one
    /// row per group), each group's partials pass followed at once by its finishing pass, so
    /// that the finishing pass can find the group's input still in cache; 0: all rows at once
    /// (two dispatches in all).
    pub split_group_bytes: u32,
    /// Split rows whose chunks fit in registers (vec4, a workgroup per chunk) take one pass
    /// over the input where the device runs a row's chunks at the same time: each workgroup
    /// keeps its chunk, shares its (max, sum) and waits for the row's other chunks', making at
    /// most this many further loads of each; a chunk whose row has not all come by then is
    /// left to a second pass, which reads it again. 0: two passes over the input, always.
    /// Softmax and log-softmax.
    pub split_wait: u32,
    /// The same for cross-entropy's loss and gradient, whose chunks share (max, exp sum, target
    /// terms). 0 in both default tables: it has been checked on software adapters (where the
    /// defaults split rows an invocation per chunk, which one pass does not serve) but not yet
    /// timed on a GPU.
    pub loss_split_wait: u32,
    /// The same for the backward of softmax and log-softmax, whose chunks share their part of
    /// the row's sum (and keep both operands in registers). 0 in both default tables, as
    /// `loss_split_wait`, for the same reason.
    pub backward_split_wait: u32,
    /// 1: a split row taken in one pass (any of the three waits above) needs no second pass.
    /// The chunk that completes its row's count waits for the others to say whether they wrote
    /// themselves, then works out those that did not (reading them again), in the same
    /// dispatch; the row's words go back to 0 with the last workgroup done with them. 0: a
    /// second pass, a workgroup per row, works out the chunks left. 0 in both default tables
    /// until it is timed on a GPU.
    pub split_alone: u32,
    /// Elements per load and store on rows that allow it (4: vec4 where the row has a multiple
    /// of 4 columns and starts at a multiple of 16 bytes; 1: always scalar).
    pub vector: u32,
    /// 1: rows that are not a multiple of 4 columns and fit in registers are held there as the
    /// `vec4`s that hold them, their ends masked, as aligned rows of up to 3 more columns are;
    /// 0: as scalars. (Such rows that are streamed or split are read as `vec4`s either way,
    /// where `vector` is 4 and their operands allow it.) 0 in both default tables: on lavapipe
    /// and llvmpipe it measured 0.83x to 1.24x the scalar registers (softmax, its backward and
    /// cross-entropy over `70000x10`, `65536x127`, `32768x510` and `16384x1023`), and it is not
    /// yet timed on a GPU.
    pub unaligned_items: u32,
    /// 1: use subgroup operations where the device has them with a fixed subgroup size (a
    /// subgroup per row, and the first step of workgroup reductions); 0: never, as on a device
    /// without them.
    pub subgroups: u32,
    /// Workgroup size of the kernels along an axis that is not the last (the `*_along` forms
    /// with `inner > 1`), which give each line (or chunk of a line) an invocation.
    pub axis_workgroup: u32,
    /// Lines along such an axis are split into chunks until the call has this many
    /// invocations (an invocation takes a chunk of one line, or of four as `vec4`s), or chunks
    /// reach `axis_min_chunk` elements, so that a few long lines still fill the device.
    pub axis_lines: u32,
    /// The fewest elements a chunk of a line along such an axis is given for the sake of
    /// `axis_lines` (a software adapter's loop budget may split lines further).
    pub axis_min_chunk: u32,
    /// Along such an axis, an invocation takes four neighbouring lines as `vec4`s where
    /// `inner` is a multiple of 4 and at most this (and `vector` is 4); one line otherwise.
    pub axis_vec4_max_inner: u32,
}

impl Tuning {
    /// The defaults for a hardware GPU. Measured on an NVIDIA H100 through Vulkan (subgroups of
    /// 32; `scripts/gpu_tune.sh`): no override of the sweep beat these on the bench's shapes.
    /// Without subgroup operations, rows of up to 128 columns take an invocation each (9.7x a
    /// workgroup per row on 65536x128 softmax) and the per-row and split kernels run in
    /// workgroups of 64 (softmax 19% to 93% of the copy on 16384x1024, 59% to 86% on
    /// 4096x4096). The batch sums take one row per invocation of a block (1.09x on 65536x128
    /// cross-entropy, 1.07x on 16384x1024; 1.0x elsewhere), and split rows' finishing pass takes
    /// the chunks last to first (1.04x to 1.08x on 64x262144, 256x65536 and 16x1048576).
    /// Cross-entropy sums the batch in one pass (`batch_tally`: 1.03x on 4096x4096 and
    /// 16384x1024, 1.06x on 65536x128), and the row pass adds up a reduced loss itself when it
    /// has at most 4096 workgroups (`loss_tally`: 1.28x on 32x10, 1.00x to 1.02x up to 4096
    /// workgroups, 0.89x on 65536x128's 8192). Split softmax rows take one pass over the input
    /// (`split_wait`: softmax 1.25x on 64x262144, 1.24x on 256x65536, 1.41x on 16x1048576,
    /// 1.05x on 4x524288; a wait of 256 or 65536 loads measured the same).
    pub const GPU: Tuning = Tuning {
        thread_workgroup: 64,
        thread_max_cols: 8,
        thread_max_cols_without_subgroups: 128,
        subgroup_workgroup: 256,
        subgroup_max_cols: 1024,
        streamed_thread_max_cols: 0,
        row_workgroup: 256,
        row_workgroup_without_subgroups: 64,
        max_items: 16,
        split_min_cols: 16384,
        split_max_rows: 512,
        split_chunk: 4096,
        workgroup_per_row: 1,
        split_team: 2,
        batch_team: 2,
        batch_tally: 1,
        loss_tally: 4096,
        batch_rows: 1,
        split_reverse: 1,
        split_group_bytes: 0,
        split_wait: 4096,
        loss_split_wait: 0,
        backward_split_wait: 0,
        split_alone: 0,
        unaligned_items: 0,
        vector: 4,
        subgroups: 1,
        axis_workgroup: 128,
        axis_lines: 65536,
        axis_min_chunk: 1024,
        axis_vec4_max_inner: u32::MAX,
    };

    /// The defaults for a software adapter (lavapipe, llvmpipe, WARP, SwiftShader). Measured
    /// on lavapipe and llvmpipe (`wgpu-softmax bench --tune`): barrier-free teams win. Short
    /// rows take an invocation or a subgroup each, in wide workgroups (fewer launches); a
    /// `vec4` row that a subgroup would stream takes an invocation, in narrow workgroups (so a
    /// few hundred rows reach every core); rows of 64k columns or more in batches of fewer
    /// than 512 rows, and any row that would otherwise take a workgroup, are split into chunks
    /// of one invocation each.
    pub const SOFTWARE: Tuning = Tuning {
        thread_workgroup: 256,
        thread_max_cols: 64,
        thread_max_cols_without_subgroups: THREAD_MAX_COLS,
        subgroup_workgroup: 256,
        subgroup_max_cols: u32::MAX,
        streamed_thread_max_cols: THREAD_MAX_COLS,
        row_workgroup: 32,
        row_workgroup_without_subgroups: 32,
        max_items: 32,
        split_min_cols: 65536,
        split_max_rows: 512,
        split_chunk: 8192,
        workgroup_per_row: 0,
        split_team: 0,
        batch_team: 0,
        batch_tally: 0,
        loss_tally: 0,
        batch_rows: 16,
        split_reverse: 0,
        split_group_bytes: 0,
        split_wait: 0,
        loss_split_wait: 0,
        backward_split_wait: 0,
        split_alone: 0,
        unaligned_items: 0,
        vector: 4,
        subgroups: 1,
        axis_workgroup: 64,
        axis_lines: 256,
        axis_min_chunk: 4096,
        axis_vec4_max_inner: 32,
    };

    /// The defaults for an adapter of this type.
    pub fn for_device_type(device_type: wgpu::DeviceType) -> Tuning {
        match device_type {
            wgpu::DeviceType::Cpu => Tuning::SOFTWARE,
            _ => Tuning::GPU,
        }
    }

    /// The strategy for a batch of `rows` rows of `cols` columns on a device with `caps`, for
    /// kernels loading `vector` elements at a time (1, or 4 on aligned rows).
    ///
    /// Where `caps.loop_budget` caps the loop iterations of one invocation, a strategy whose
    /// invocations would loop longer is replaced by one with shorter loops (more invocations per
    /// row, then split rows): llvmpipe and lavapipe end an invocation after 65535 iterations,
    /// silently, so it would return wrong results.
    pub fn choose(&self, rows: usize, cols: usize, caps: &Capabilities, vector: u32) -> Strategy {
        let cols32 = u32::try_from(cols).unwrap_or(u32::MAX);
        let vector = vector.max(1);
        let split = Strategy::SplitRow {
            chunk: self.split_chunk,
            per_invocation: self.split_team == 0,
        };
        let workgroup = Strategy::RowPerWorkgroup {
            items: self.items(cols, self.row_workgroup_on(caps), vector),
        };
        let wide_and_few = cols32 >= self.split_min_cols && rows < self.split_max_rows as usize;
        let first = if wide_and_few {
            split
        } else if cols32 <= self.thread_max_cols
            || (caps.subgroup_size.is_none() && cols32 <= self.thread_max_cols_without_subgroups)
        {
            Strategy::RowPerThread {
                items: self.items(cols, 1, vector),
            }
        } else if let (Some(sg), true) = (caps.subgroup_size, cols32 <= self.subgroup_max_cols) {
            match self.items(cols, sg, vector) {
                0 if vector == 4 && cols32 <= self.streamed_thread_max_cols => {
                    Strategy::RowPerThread {
                        items: self.items(cols, 1, vector),
                    }
                }
                items => Strategy::RowPerSubgroup { items },
            }
        } else if self.workgroup_per_row == 0 {
            split
        } else {
            workgroup
        };
        let Some(budget) = caps.loop_budget else {
            return first;
        };
        let wider = [first, workgroup];
        wider
            .into_iter()
            .take(if self.workgroup_per_row == 0 { 1 } else { 2 })
            .find(|&s| self.loop_iterations(s, cols, caps, vector) <= budget)
            .unwrap_or_else(|| self.split_within(cols, budget, caps, vector))
    }

    /// The workgroup size of the per-row and split kernels on a device with `caps`.
    pub fn row_workgroup_on(&self, caps: &Capabilities) -> u32 {
        self.row_workgroup_for(caps.subgroup_size)
    }

    /// Chunks per line of a call along an axis that is not the last, whose lines of `len`
    /// elements take `invocations` invocations uncut (the line count, or a quarter of it where
    /// an invocation takes four lines as `vec4`s): enough for `axis_lines` invocations, as long
    /// as chunks keep `axis_min_chunk` elements, and where `caps` has a loop budget, enough that
    /// no invocation's loops exceed it (a chunk is looped over about three times: its maximum
    /// and sum, then its output), but for occupancy no more than an eighth of the budget (the
    /// invocation that finishes a chunk loops over all of its line's partials: 50 000 chunks
    /// of 2 left 59 087 of 200 000 softmax outputs wrong on lavapipe).
    pub fn axis_chunks(&self, invocations: usize, len: usize, caps: &Capabilities) -> usize {
        let by_budget = caps
            .loop_budget
            .map_or(1, |budget| len.div_ceil((budget / 4).max(1) as usize));
        let wanted = (self.axis_lines as usize).div_ceil(invocations.max(1));
        let by_occupancy = wanted.min(len.div_ceil(self.axis_min_chunk.max(1) as usize));
        let by_occupancy = caps.loop_budget.map_or(by_occupancy, |budget| {
            by_occupancy.min((budget / 8).max(1) as usize)
        });
        by_budget.max(by_occupancy).max(1)
    }

    /// The same for a device whose fixed subgroup size is `subgroup` (`None`: no subgroup
    /// operations).
    fn row_workgroup_for(&self, subgroup: Option<u32>) -> u32 {
        match subgroup {
            Some(_) => self.row_workgroup,
            None => self.row_workgroup_without_subgroups,
        }
    }

    /// Elements per load for rows of `cols` columns: 4 when the tuning allows it, `cols` is a
    /// multiple of 4 and every operand starts at a multiple of 16 bytes (`aligned`); else 1.
    pub fn vector_for(&self, cols: usize, aligned: bool) -> u32 {
        if self.vector >= 4 && aligned && cols.is_multiple_of(4) {
            4
        } else {
            1
        }
    }

    /// Loads per invocation for a team of `team` on rows of `cols` loaded `vector` elements at a
    /// time when the row fits in registers, else 0 (streamed).
    ///
    /// Exactly the loads the row needs, not a power of two above it: a kernel runs all `ITEMS`
    /// iterations (the ones past the row masked), and on software adapters, where the lanes of
    /// a SIMD register are invocations, the masked ones cost nearly as much as the others. Rows
    /// of 10 columns ran 1.2x faster with 10 loads than with 16 on lavapipe. The price is one
    /// pipeline per distinct count, compiled once and cached.
    fn items(&self, cols: usize, team: u32, vector: u32) -> u32 {
        let per_invocation = u32::try_from(cols.div_ceil(vector as usize))
            .unwrap_or(u32::MAX)
            .div_ceil(team.max(1));
        let max_items = if vector == 4 {
            self.max_items
        } else {
            self.max_items.min(MAX_ITEMS)
        };
        if per_invocation <= max_items {
            per_invocation.max(1)
        } else {
            0
        }
    }

    /// Loop iterations one invocation runs: at most three passes over its share of a row plus
    /// the workgroup reductions; an upper bound for every kernel family.
    pub fn loop_iterations(
        &self,
        strategy: Strategy,
        cols: usize,
        caps: &Capabilities,
        vector: u32,
    ) -> u64 {
        let units = (cols as u64).div_ceil(u64::from(vector.max(1)));
        let wg = u64::from(self.row_workgroup_on(caps));
        let reductions = 2 * wg;
        // Three streamed passes over `n` loads, plus the outer loop of the blocked sum (blocks of
        // 32 scalars or 8 vec4s in the shaders) and the padding of its last block.
        let streamed = |n: u64, team: u64| 3 * n.div_ceil(team) + n.div_ceil(8 * team) + 16;
        let passes = |team: u64, items: u32| match items {
            0 => streamed(units, team),
            items => 3 * u64::from(items),
        };
        match strategy {
            Strategy::RowPerThread { items } => passes(1, items),
            Strategy::RowPerSubgroup { items } => {
                passes(u64::from(caps.subgroup_size.unwrap_or(1)), items)
            }
            Strategy::RowPerWorkgroup { items } => passes(wg, items) + reductions,
            Strategy::SplitRow {
                chunk,
                per_invocation,
            } => {
                let team = if per_invocation { 1 } else { wg };
                let chunk = u64::from(chunk).div_ceil(u64::from(vector.max(1)));
                let chunks = cols.div_ceil(chunk.max(1) as usize * vector.max(1) as usize) as u64;
                streamed(chunk, team) + 2 * chunks.div_ceil(team) + reductions
            }
        }
    }

    /// A split whose chunks keep every invocation within `budget` loop iterations: shorter
    /// chunks than `split_chunk` where a chunk's own loops are too long, longer ones where a
    /// row has so many chunks that combining their partials is (chunks of a few elements).
    fn split_within(&self, cols: usize, budget: u64, caps: &Capabilities, vector: u32) -> Strategy {
        let per_invocation = self.split_team == 0;
        let split = |chunk| Strategy::SplitRow {
            chunk,
            per_invocation,
        };
        let fits = |chunk| self.loop_iterations(split(chunk), cols, caps, vector) <= budget;
        let mut chunk = self.split_chunk;
        while chunk > self.row_workgroup_on(caps).max(4) && !fits(chunk) {
            chunk /= 2;
        }
        if !fits(chunk) {
            let mut longer = self.split_chunk;
            while !fits(longer) && (longer as usize) < cols && longer < 1 << 30 {
                longer = longer.saturating_mul(2);
            }
            if fits(longer) {
                chunk = longer;
            }
        }
        split(chunk)
    }

    /// The same tuning with workgroup sizes the device allows and `subgroup` divides.
    pub(crate) fn clamped(mut self, limits: &wgpu::Limits, subgroup: Option<u32>) -> Tuning {
        let max = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x)
            .min(256);
        self.thread_workgroup = self.thread_workgroup.clamp(1, max);
        self.thread_max_cols = self.thread_max_cols.min(THREAD_MAX_COLS);
        self.thread_max_cols_without_subgroups =
            self.thread_max_cols_without_subgroups.min(THREAD_MAX_COLS);
        self.streamed_thread_max_cols = self.streamed_thread_max_cols.min(THREAD_MAX_COLS);
        self.row_workgroup = self.row_workgroup.clamp(1, max);
        self.row_workgroup_without_subgroups = self.row_workgroup_without_subgroups.clamp(1, max);
        let sg = subgroup.unwrap_or(1);
        self.subgroup_workgroup = (self.subgroup_workgroup.clamp(sg, max.max(sg)) / sg) * sg;
        self.max_items = self.max_items.clamp(1, MAX_ITEMS_VEC4).next_power_of_two();
        // At most 2^30 elements, so rounding a chunk up to whole vec4s cannot overflow.
        self.split_chunk = self
            .split_chunk
            .clamp(self.row_workgroup_for(subgroup), 1 << 30);
        self.vector = if self.vector >= 4 { 4 } else { 1 };
        self.subgroups = self.subgroups.min(1);
        self.axis_workgroup = self.axis_workgroup.clamp(1, max);
        self.axis_min_chunk = self.axis_min_chunk.max(1);
        self.workgroup_per_row = self.workgroup_per_row.min(1);
        self.batch_rows = self.batch_rows.max(1);
        self.split_reverse = self.split_reverse.min(1);
        self.split_alone = self.split_alone.min(1);
        self.unaligned_items = self.unaligned_items.min(1);
        self.batch_tally = self.batch_tally.min(1);
        self.loss_tally = self.loss_tally.min(TALLY_MAX_SLOTS);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Capabilities = Capabilities {
        subgroup_size: None,
        loop_budget: None,
    };
    const NVIDIA: Capabilities = Capabilities {
        subgroup_size: Some(32),
        loop_budget: None,
    };
    const LAVAPIPE: Capabilities = Capabilities {
        subgroup_size: Some(8),
        loop_budget: Some(SOFTWARE_LOOP_BUDGET),
    };
    const LLVMPIPE: Capabilities = Capabilities {
        subgroup_size: None,
        loop_budget: Some(SOFTWARE_LOOP_BUDGET),
    };

    #[test]
    fn clamping_bounds_every_field_a_caller_can_set() {
        let wild = Tuning {
            split_chunk: u32::MAX,
            subgroups: 7,
            vector: 3,
            max_items: 5,
            streamed_thread_max_cols: u32::MAX,
            workgroup_per_row: 9,
            split_reverse: 7,
            split_alone: 3,
            unaligned_items: 2,
            batch_tally: 5,
            loss_tally: u32::MAX,
            ..Tuning::GPU
        }
        .clamped(&wgpu::Limits::default(), Some(32));
        assert_eq!(wild.split_reverse, 1);
        assert_eq!(wild.split_alone, 1);
        assert_eq!(wild.unaligned_items, 1);
        assert_eq!(wild.batch_tally, 1);
        assert_eq!(wild.loss_tally, TALLY_MAX_SLOTS);
        assert_eq!(wild.streamed_thread_max_cols, THREAD_MAX_COLS);
        assert_eq!(wild.workgroup_per_row, 1);
        assert_eq!(wild.split_chunk, 1 << 30);
        assert!(wild.split_chunk.checked_next_multiple_of(4).is_some());
        assert_eq!(wild.subgroups, 1);
        assert_eq!(wild.vector, 1);
        assert_eq!(wild.max_items, 8);
        let tiny = Tuning {
            split_chunk: 0,
            ..Tuning::GPU
        }
        .clamped(&wgpu::Limits::default(), Some(32));
        assert_eq!(tiny.split_chunk, Tuning::GPU.row_workgroup);
        let tiny = Tuning {
            split_chunk: 0,
            row_workgroup_without_subgroups: 100_000,
            ..Tuning::GPU
        }
        .clamped(&wgpu::Limits::default(), None);
        assert_eq!(tiny.row_workgroup_without_subgroups, 256);
        assert_eq!(tiny.split_chunk, 256);
    }

    #[test]
    fn strategies_say_who_works_on_a_row() {
        let cases = [
            (
                Strategy::RowPerThread { items: 1 },
                "invocation per row, 1 load in registers",
            ),
            (
                Strategy::RowPerSubgroup { items: 8 },
                "subgroup per row, 8 loads in registers",
            ),
            (
                Strategy::RowPerWorkgroup { items: 0 },
                "workgroup per row, streamed",
            ),
            (
                Strategy::SplitRow {
                    chunk: 4096,
                    per_invocation: false,
                },
                "split in chunks of 4096, workgroup per chunk",
            ),
            (
                Strategy::SplitRow {
                    chunk: 8192,
                    per_invocation: true,
                },
                "split in chunks of 8192, invocation per chunk",
            ),
        ];
        for (strategy, text) in cases {
            assert_eq!(strategy.to_string(), text);
        }
    }

    #[test]
    fn short_rows_run_one_invocation_per_row() {
        assert_eq!(
            Tuning::GPU.choose(70_000, 8, &NVIDIA, 1),
            Strategy::RowPerThread { items: 8 }
        );
        assert_eq!(
            Tuning::SOFTWARE.choose(1, 1, &LAVAPIPE, 1),
            Strategy::RowPerThread { items: 1 }
        );
        // Exactly the loads a row needs, not the power of two above.
        assert_eq!(
            Tuning::SOFTWARE.choose(1 << 20, 10, &LAVAPIPE, 1),
            Strategy::RowPerThread { items: 10 }
        );
        assert_eq!(
            Tuning::SOFTWARE.choose(1 << 18, 40, &LAVAPIPE, 4),
            Strategy::RowPerThread { items: 10 }
        );
    }

    #[test]
    fn medium_rows_use_a_subgroup_where_there_is_one() {
        assert_eq!(
            Tuning::GPU.choose(70_000, 10, &NVIDIA, 1),
            Strategy::RowPerSubgroup { items: 1 }
        );
        assert_eq!(
            Tuning::GPU.choose(4096, 1000, &NVIDIA, 1),
            Strategy::RowPerSubgroup { items: 0 }
        );
        assert_eq!(
            Tuning::GPU.choose(4096, 500, &NVIDIA, 1),
            Strategy::RowPerSubgroup { items: 16 }
        );
        // Without subgroups, workgroups of 64: 16 loads each.
        assert_eq!(
            Tuning::GPU.choose(4096, 1000, &PLAIN, 1),
            Strategy::RowPerWorkgroup { items: 16 }
        );
        assert_eq!(
            Tuning::GPU.choose(4096, 8192, &NVIDIA, 1),
            Strategy::RowPerWorkgroup { items: 0 }
        );
    }

    /// A tuning, a shape, a device, a load width and the strategy expected of them.
    type Case<'a> = (Tuning, (usize, usize), &'a Capabilities, u32, Strategy);

    /// Checks `tuning.choose(rows, cols, caps, vector)` for each case.
    fn check_choices(cases: &[Case<'_>]) {
        for &(tuning, (rows, cols), caps, vector, expected) in cases {
            assert_eq!(
                tuning.choose(rows, cols, caps, vector),
                expected,
                "{rows}x{cols}, vector {vector}, {caps:?}"
            );
        }
    }

    #[test]
    fn software_adapters_give_a_row_a_subgroup_would_stream_to_one_invocation() {
        let sw = Tuning::SOFTWARE;
        let gpu = Tuning {
            subgroup_max_cols: 4096,
            ..Tuning::GPU
        };
        let thread = Strategy::RowPerThread { items: 0 };
        let streamed = Strategy::RowPerSubgroup { items: 0 };
        check_choices(&[
            (sw, (4096, 1028), &LAVAPIPE, 4, thread),
            (sw, (4096, 2048), &LAVAPIPE, 4, thread),
            (sw, (4096, 4096), &LAVAPIPE, 4, thread),
            // Rows the subgroup holds in registers stay with it, and so do scalar loads and rows
            // past THREAD_MAX_COLS.
            (
                sw,
                (16_384, 1024),
                &LAVAPIPE,
                4,
                Strategy::RowPerSubgroup { items: 32 },
            ),
            (sw, (4096, 4096), &LAVAPIPE, 1, streamed),
            (sw, (1024, 4100), &LAVAPIPE, 4, streamed),
            // GPUs keep the subgroup.
            (gpu, (4096, 4096), &NVIDIA, 4, streamed),
        ]);
    }

    #[test]
    fn gpus_without_subgroups_give_short_rows_an_invocation_and_others_workgroups_of_64() {
        let gpu = Tuning::GPU;
        assert_eq!(gpu.row_workgroup_on(&NVIDIA), 256);
        assert_eq!(gpu.row_workgroup_on(&PLAIN), 64);
        let sw = Tuning::SOFTWARE;
        assert_eq!(sw.row_workgroup_on(&LLVMPIPE), sw.row_workgroup);
        let thread = |items| Strategy::RowPerThread { items };
        let workgroup = |items| Strategy::RowPerWorkgroup { items };
        check_choices(&[
            // Up to 128 columns, an invocation each.
            (gpu, (65_536, 128), &PLAIN, 4, thread(0)),
            (gpu, (65_536, 128), &PLAIN, 1, thread(0)),
            (gpu, (32, 10), &PLAIN, 1, thread(10)),
            (gpu, (65_536, 64), &PLAIN, 4, thread(16)),
            (gpu, (4096, 132), &PLAIN, 4, workgroup(1)),
            // With subgroups, a subgroup each.
            (
                gpu,
                (65_536, 128),
                &NVIDIA,
                4,
                Strategy::RowPerSubgroup { items: 1 },
            ),
            // 4096 scalar columns: 64 loads an invocation in workgroups of 64 (too many to
            // hold), 16 in workgroups of 256.
            (gpu, (4096, 4096), &PLAIN, 1, workgroup(0)),
            (gpu, (4096, 4096), &PLAIN, 4, workgroup(16)),
            (gpu, (4096, 4096), &NVIDIA, 1, workgroup(16)),
            (gpu, (16_384, 1024), &PLAIN, 4, workgroup(4)),
        ]);
    }

    #[test]
    fn software_adapters_split_rows_rather_than_give_them_a_workgroup() {
        let sw = Tuning::SOFTWARE;
        let split = Strategy::SplitRow {
            chunk: 8192,
            per_invocation: true,
        };
        let mut cases = vec![(
            sw,
            (8192, 4096),
            &LLVMPIPE,
            4,
            Strategy::RowPerThread { items: 0 },
        )];
        for shape in [(8192, 4104), (1024, 16_384), (512, 65_536), (100_000, 5000)] {
            cases.extend([
                (sw, shape, &LLVMPIPE, 1, split),
                (sw, shape, &LLVMPIPE, 4, split),
            ]);
        }
        // With workgroups allowed, such rows take one each.
        let workgroups = Tuning {
            workgroup_per_row: 1,
            ..sw
        };
        let workgroup = Strategy::RowPerWorkgroup { items: 0 };
        cases.push((workgroups, (1024, 16_384), &LLVMPIPE, 4, workgroup));
        check_choices(&cases);
        for cols in [700_000, 1 << 20, 33_000_000] {
            let s = sw.choose(1000, cols, &LLVMPIPE, 1);
            assert!(matches!(s, Strategy::SplitRow { .. }), "{cols}: {s:?}");
            assert!(
                sw.loop_iterations(s, cols, &LLVMPIPE, 1) <= SOFTWARE_LOOP_BUDGET,
                "{cols}: {s:?}"
            );
        }
    }

    #[test]
    fn few_long_rows_are_split() {
        assert_eq!(
            Tuning::GPU.choose(4, 300_000, &NVIDIA, 1),
            Strategy::SplitRow {
                chunk: 4096,
                per_invocation: false
            }
        );
        assert_eq!(
            Tuning::GPU.choose(100_000, 300_000, &NVIDIA, 1),
            Strategy::RowPerWorkgroup { items: 0 }
        );
    }

    #[test]
    fn axis_lines_split_for_occupancy_and_the_loop_budget() {
        let gpu = Tuning::GPU;
        // Many lines: one chunk each, however long.
        assert_eq!(gpu.axis_chunks(1 << 20, 21, &NVIDIA), 1);
        assert_eq!(gpu.axis_chunks(65536, 1 << 20, &NVIDIA), 1);
        // Few long lines: chunks of at least axis_min_chunk until axis_lines invocations.
        assert_eq!(gpu.axis_chunks(64, 1 << 20, &NVIDIA), 1024);
        assert_eq!(gpu.axis_chunks(4, 4096, &NVIDIA), 4);
        assert_eq!(gpu.axis_chunks(4, 100, &NVIDIA), 1);
        // The count is of invocations: 16384 lines taken four to an invocation are cut as
        // 4096 lines are.
        assert_eq!(gpu.axis_chunks(16384, 1 << 14, &NVIDIA), 4);
        assert_eq!(gpu.axis_chunks(16384 / 4, 1 << 14, &NVIDIA), 16);
        // Software adapters: every chunk within a quarter of the loop budget, whatever the
        // line count.
        let sw = Tuning::SOFTWARE;
        let budget = SOFTWARE_LOOP_BUDGET as usize / 4;
        for (lines, len) in [
            (1 << 20, 70_000),
            (2, 70_000),
            (1, 1 << 20),
            (1000, budget + 1),
        ] {
            let chunks = sw.axis_chunks(lines, len, &LAVAPIPE);
            assert!(
                len.div_ceil(chunks) <= budget,
                "{lines} x {len}: {chunks} chunks"
            );
        }
        assert_eq!(sw.axis_chunks(1 << 20, 1000, &LLVMPIPE), 1);
        assert_eq!(sw.axis_chunks(2, 16384, &LLVMPIPE), 4);
        // Chunks asked for occupancy stop at an eighth of the budget: the finishing invocation
        // loops over all of a line's partials. GPUs have no such cap.
        let tiny = Tuning {
            axis_min_chunk: 1,
            axis_lines: u32::MAX,
            ..Tuning::SOFTWARE
        };
        let eighth = SOFTWARE_LOOP_BUDGET as usize / 8;
        assert_eq!(tiny.axis_chunks(2, 100_000, &LAVAPIPE), eighth);
        assert_eq!(tiny.axis_chunks(2, 1000, &LAVAPIPE), 1000);
        assert_eq!(tiny.axis_chunks(2, 100_000, &NVIDIA), 100_000);
    }

    #[test]
    fn software_loop_budget_escalates_long_loops() {
        let thread = Tuning {
            thread_max_cols: u32::MAX,
            ..Tuning::SOFTWARE
        };
        let s = thread.choose(2, 30_000, &LAVAPIPE, 1);
        assert!(thread.loop_iterations(s, 30_000, &LAVAPIPE, 1) <= SOFTWARE_LOOP_BUDGET);
        assert_eq!(
            thread.choose(2, 30_000, &PLAIN, 1),
            Strategy::RowPerThread { items: 0 }
        );
        for cols in [700_000, 1 << 20, 33_000_000] {
            let s = Tuning::SOFTWARE.choose(1000, cols, &LAVAPIPE, 1);
            assert!(
                Tuning::SOFTWARE.loop_iterations(s, cols, &LAVAPIPE, 1) <= SOFTWARE_LOOP_BUDGET,
                "{cols}: {s:?}"
            );
        }
    }

    #[test]
    fn aligned_rows_count_registers_in_vec4s() {
        assert_eq!(
            Tuning::GPU.choose(4096, 1024, &NVIDIA, 4),
            Strategy::RowPerSubgroup { items: 8 }
        );
        assert_eq!(
            Tuning::GPU.choose(4096, 1024, &NVIDIA, 1),
            Strategy::RowPerSubgroup { items: 0 }
        );
        assert_eq!(
            Tuning::SOFTWARE.choose(65_536, 128, &LAVAPIPE, 4),
            Strategy::RowPerSubgroup { items: 4 }
        );
        // Up to 32 vec4s per invocation; scalars stop at 16.
        for (cols, vector, items) in [(1024, 4, 32), (256, 1, 0), (128, 1, 16)] {
            assert_eq!(
                Tuning::SOFTWARE.choose(16_384, cols, &LAVAPIPE, vector),
                Strategy::RowPerSubgroup { items },
                "{cols} columns, vector {vector}"
            );
        }
    }

    #[test]
    fn software_splits_give_each_invocation_a_chunk_within_the_loop_budget() {
        for vector in [1, 4] {
            for cols in [262_144, 524_288, 1 << 24] {
                let s = Tuning::SOFTWARE.choose(4, cols, &LAVAPIPE, vector);
                assert!(
                    matches!(
                        s,
                        Strategy::SplitRow {
                            per_invocation: true,
                            ..
                        }
                    ),
                    "{cols}: {s:?}"
                );
                assert!(
                    Tuning::SOFTWARE.loop_iterations(s, cols, &LAVAPIPE, vector)
                        <= SOFTWARE_LOOP_BUDGET,
                    "{cols} {vector}: {s:?}"
                );
            }
        }
    }

    /// Chunks so short that a row has more partials than the finishing pass may combine within
    /// the budget grow instead: chunks of 1 element over 36 000 columns, 72 000 iterations for
    /// one invocation, ran wrong on llvmpipe (17 653 of 36 000 elements); chunks of 2 ran right.
    #[test]
    fn software_splits_of_many_chunks_lengthen_them_within_the_loop_budget() {
        let tiny = Tuning {
            thread_max_cols: 0,
            row_workgroup: 1,
            row_workgroup_without_subgroups: 1,
            split_min_cols: 1,
            split_max_rows: u32::MAX,
            split_chunk: 1,
            split_team: 0,
            ..Tuning::GPU
        };
        for caps in [&LAVAPIPE, &LLVMPIPE] {
            for cols in [36_000, 1 << 20] {
                let s = tiny.choose(1, cols, caps, 1);
                assert!(
                    matches!(s, Strategy::SplitRow { chunk: 2.., .. }),
                    "{cols}: {s:?}"
                );
                assert!(
                    tiny.loop_iterations(s, cols, caps, 1) <= SOFTWARE_LOOP_BUDGET,
                    "{cols}: {s:?}"
                );
            }
            // Where the chunks fit, they stay as asked.
            assert_eq!(
                tiny.choose(1, 20_000, caps, 1),
                Strategy::SplitRow {
                    chunk: 1,
                    per_invocation: true
                }
            );
        }
    }
}
