//! Which kernel runs a row-wise op, chosen by row length, row count and adapter.
//!
//! The table is data, [`Tuning`], so that benchmarks can override it. Two defaults exist because
//! the best kernel differs by an order of magnitude between GPUs and software rasterisers: on
//! lavapipe/llvmpipe a workgroup barrier switches between every group of SIMD lanes of the
//! workgroup, so barrier-free and small-workgroup kernels win there, whereas a GPU needs many
//! invocations per row to hide memory latency.

/// The widest row ever given to a single invocation.
pub const THREAD_MAX_COLS: u32 = 4096;

/// The loop iterations an invocation may run on llvmpipe/lavapipe (which stop it, silently, at
/// 65535), with room for the loops outside the main passes.
pub const SOFTWARE_LOOP_BUDGET: u64 = 60_000;

/// The kernel strategy for one op call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One invocation per row, no barriers.
    RowPerThread,
    /// One workgroup per row; `items` elements per invocation are kept in registers (0: the row
    /// is streamed from memory in each phase).
    RowPerWorkgroup {
        /// Elements held in registers per invocation.
        items: u32,
    },
    /// Each row is split into chunks of `chunk` elements, one workgroup per chunk.
    SplitRow {
        /// Elements per chunk.
        chunk: u32,
    },
}

/// Thresholds and workgroup sizes of the kernel choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Workgroup size of the one-invocation-per-row kernel.
    pub thread_workgroup: u32,
    /// Rows of at most this many columns run one invocation per row.
    pub thread_max_cols: u32,
    /// Workgroup size of the per-row and split kernels.
    pub row_workgroup: u32,
    /// The most elements an invocation keeps in registers (a power of two, at most 16).
    pub max_items: u32,
    /// Rows of at least this many columns are split across workgroups ...
    pub split_min_cols: u32,
    /// ... when the batch has fewer rows than this (otherwise one workgroup per row already
    /// fills the device).
    pub split_max_rows: u32,
    /// Elements per chunk of a split row.
    pub split_chunk: u32,
}

impl Tuning {
    /// The defaults for a hardware GPU.
    pub const GPU: Tuning = Tuning {
        thread_workgroup: 64,
        thread_max_cols: 16,
        row_workgroup: 256,
        max_items: 16,
        split_min_cols: 16384,
        split_max_rows: 512,
        split_chunk: 4096,
    };

    /// The defaults for a software adapter (lavapipe, llvmpipe, WARP, SwiftShader).
    pub const SOFTWARE: Tuning = Tuning {
        thread_workgroup: 64,
        thread_max_cols: 64,
        row_workgroup: 32,
        max_items: 16,
        split_min_cols: 65536,
        split_max_rows: 8,
        split_chunk: 16384,
    };

    /// The defaults for an adapter of this type.
    pub fn for_device_type(device_type: wgpu::DeviceType) -> Tuning {
        match device_type {
            wgpu::DeviceType::Cpu => Tuning::SOFTWARE,
            _ => Tuning::GPU,
        }
    }

    /// The strategy for a batch of `rows` rows of `cols` columns.
    pub fn choose(&self, rows: usize, cols: usize) -> Strategy {
        let cols32 = u32::try_from(cols).unwrap_or(u32::MAX);
        if cols32 <= self.thread_max_cols {
            return Strategy::RowPerThread;
        }
        if cols32 >= self.split_min_cols && rows < self.split_max_rows as usize {
            return Strategy::SplitRow {
                chunk: self.split_chunk,
            };
        }
        Strategy::RowPerWorkgroup {
            items: self.items_for(cols),
        }
    }

    /// Like [`Tuning::choose`], escalating to a strategy with shorter loops (one workgroup per
    /// row, then split rows) when `loop_budget` caps the loop iterations one invocation may run.
    ///
    /// llvmpipe and lavapipe end an invocation after 65535 loop iterations in total, silently, so
    /// on software adapters a strategy whose invocations loop longer would return wrong results.
    pub fn choose_within(&self, rows: usize, cols: usize, loop_budget: Option<u64>) -> Strategy {
        let first = self.choose(rows, cols);
        let Some(budget) = loop_budget else {
            return first;
        };
        let per_row = match first {
            Strategy::RowPerThread => Strategy::RowPerWorkgroup {
                items: self.items_for(cols),
            },
            other => other,
        };
        for strategy in [first, per_row] {
            if self.loop_iterations(strategy, cols) <= budget {
                return strategy;
            }
        }
        self.split_within(cols, budget)
    }

    /// Loop iterations one invocation runs, at most three passes over its share of a row plus the
    /// workgroup reductions; an upper bound for every kernel family.
    pub fn loop_iterations(&self, strategy: Strategy, cols: usize) -> u64 {
        let cols = cols as u64;
        let wg = u64::from(self.row_workgroup);
        let reductions = 2 * wg;
        match strategy {
            Strategy::RowPerThread => 3 * cols,
            Strategy::RowPerWorkgroup { items: 0 } => 3 * cols.div_ceil(wg) + reductions,
            Strategy::RowPerWorkgroup { items } => 3 * u64::from(items) + reductions,
            Strategy::SplitRow { chunk } => {
                let chunk = u64::from(chunk);
                3 * chunk.div_ceil(wg) + 2 * cols.div_ceil(chunk).div_ceil(wg) + reductions
            }
        }
    }

    fn items_for(&self, cols: usize) -> u32 {
        let per_invocation = u32::try_from(cols)
            .unwrap_or(u32::MAX)
            .div_ceil(self.row_workgroup);
        if per_invocation <= self.max_items {
            per_invocation.next_power_of_two()
        } else {
            0
        }
    }

    /// A split whose chunks keep every invocation within `budget` loop iterations.
    fn split_within(&self, cols: usize, budget: u64) -> Strategy {
        let mut chunk = self.split_chunk;
        while chunk > self.row_workgroup
            && self.loop_iterations(Strategy::SplitRow { chunk }, cols) > budget
        {
            chunk /= 2;
        }
        Strategy::SplitRow { chunk }
    }

    /// The same tuning with workgroup sizes no larger than the device allows.
    pub(crate) fn clamped(mut self, limits: &wgpu::Limits) -> Tuning {
        let max = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x)
            .min(256);
        self.thread_workgroup = self.thread_workgroup.clamp(1, max);
        // One invocation summing a whole row in f32 loses accuracy past a few thousand terms.
        self.thread_max_cols = self.thread_max_cols.min(THREAD_MAX_COLS);
        self.row_workgroup = self.row_workgroup.clamp(1, max);
        self.max_items = self.max_items.clamp(1, 16).next_power_of_two();
        self.split_chunk = self.split_chunk.max(self.row_workgroup);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_rows_run_one_invocation_per_row() {
        assert_eq!(Tuning::GPU.choose(70_000, 10), Strategy::RowPerThread);
        assert_eq!(Tuning::SOFTWARE.choose(1, 1), Strategy::RowPerThread);
    }

    #[test]
    fn medium_rows_are_cached_in_registers_when_they_fit() {
        assert_eq!(
            Tuning::GPU.choose(4096, 1000),
            Strategy::RowPerWorkgroup { items: 4 }
        );
        assert_eq!(
            Tuning::GPU.choose(33, 2049),
            Strategy::RowPerWorkgroup { items: 16 }
        );
        assert_eq!(
            Tuning::GPU.choose(4096, 8192),
            Strategy::RowPerWorkgroup { items: 0 }
        );
    }

    #[test]
    fn software_loop_budget_escalates_long_loops() {
        let budget = Some(SOFTWARE_LOOP_BUDGET);
        let thread = Tuning {
            thread_max_cols: u32::MAX,
            ..Tuning::SOFTWARE
        };
        let s = thread.choose_within(2, 30_000, budget);
        assert!(
            thread.loop_iterations(s, 30_000) <= SOFTWARE_LOOP_BUDGET,
            "{s:?}"
        );
        assert_eq!(
            thread.choose_within(2, 30_000, None),
            Strategy::RowPerThread
        );
        for cols in [700_000, 1 << 20, 33_000_000] {
            let s = Tuning::SOFTWARE.choose_within(1000, cols, budget);
            assert!(matches!(s, Strategy::SplitRow { .. }), "{cols}: {s:?}");
            assert!(Tuning::SOFTWARE.loop_iterations(s, cols) <= SOFTWARE_LOOP_BUDGET);
        }
        assert_eq!(
            Tuning::SOFTWARE.choose_within(4096, 1000, budget),
            Tuning::SOFTWARE.choose(4096, 1000)
        );
    }

    #[test]
    fn few_long_rows_are_split() {
        assert_eq!(
            Tuning::GPU.choose(4, 300_000),
            Strategy::SplitRow { chunk: 4096 }
        );
        assert_eq!(
            Tuning::GPU.choose(100_000, 300_000),
            Strategy::RowPerWorkgroup { items: 0 }
        );
    }
}
