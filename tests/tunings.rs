//! Any kernel-choice table gives the reference's results: random [`Tuning`]s (odd workgroup
//! sizes, thresholds at 0 and `u32::MAX`, chunks of a few elements, every switch either way)
//! on random shapes, special values included, for every op along rows and along an axis.
//!
//! A context accepts any `Tuning` (it clamps what the device cannot run), so every table a
//! caller or `wgpu-softmax bench --tune` may give must plan kernels that fit the device's limits
//! and a software adapter's loop budget, and compute the same values. Each case builds a device
//! and compiles its own specialisations, so CI runs few cases; `WGPU_SOFTMAX_TUNING_CASES`
//! asks for more (a longer search on a workstation).

mod common;

use common::arena::{usage, Arena};
use common::{
    assert_grad_close, bits, bounded_context, check_host_and_in_place, context, index_targets,
    logits, probability_targets, tuned, LOSS_TOLERANCE,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{rngs::StdRng, Rng, SeedableRng};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{
    AxisLayout, Comparison, Context, CrossEntropyBuffers, CrossEntropyOptions, DeviceGradOutput,
    Error, GradDestination, GradOutput, Reduction, TargetEncoding, Targets, Tolerance, Tuning,
};

fn config() -> ProptestConfig {
    let cases = std::env::var("WGPU_SOFTMAX_TUNING_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    ProptestConfig {
        cases,
        // A failing case is printed with its table and shape; nothing is written into the
        // source tree.
        failure_persistence: None,
        // Each shrinking step compiles kernels again and may take seconds on a software
        // adapter (64 steps took over ten minutes once): keep a failure's report quick.
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    }
}

/// One of `values`, each as likely.
fn one_of(values: &'static [u32]) -> BoxedStrategy<u32> {
    proptest::sample::select(values).boxed()
}

const MAX: u32 = u32::MAX;

/// A kernel-choice table with every field drawn from values that reach its edges: workgroup
/// sizes that are no power of two or exceed the device's, thresholds that send every row one
/// way, chunks shorter than a workgroup or a `vec4`, and the switches either way.
fn tuning() -> impl Strategy<Value = Tuning> {
    let teams = (
        one_of(&[1, 3, 32, 48, 64, 100, 256, 1024]),
        one_of(&[0, 1, 8, 33, 64, 512, MAX]),
        one_of(&[0, 8, 128, 1024, MAX]),
        one_of(&[1, 8, 24, 32, 100, 256]),
        one_of(&[0, 64, 1024, MAX]),
        one_of(&[0, 128, MAX]),
        one_of(&[1, 3, 32, 48, 64, 100, 256]),
        one_of(&[1, 5, 32, 64, 200]),
        one_of(&[1, 2, 3, 4, 8, 16, 32, 64]),
    );
    let splits = (
        one_of(&[1, 100, 1024, 16384, MAX]),
        one_of(&[1, 4, 512, MAX]),
        one_of(&[1, 4, 5, 8, 37, 300, 1024, 4096]),
        one_of(&[0, 1]),
        one_of(&[0, 1, 2]),
        one_of(&[0, 1, 2]),
        one_of(&[0, 1]),
        one_of(&[0, 1, 4096, MAX]),
        one_of(&[0, 1]),
        one_of(&[1, 3, 16, 100]),
        one_of(&[0, 1024, 65536]),
    );
    let rest = (
        one_of(&[0, 1, 4096]),
        one_of(&[0, 1, 4096]),
        one_of(&[0, 1, 4096]),
        one_of(&[0, 1]),
        one_of(&[1, 4]),
        one_of(&[0, 1]),
        one_of(&[0, 1]),
        one_of(&[1, 37, 64, 256]),
        one_of(&[1, 256, 65536]),
        one_of(&[1, 7, 1024, 4096]),
        one_of(&[0, 4, 32, MAX]),
    );
    (teams, splits, rest).prop_map(|(t, s, r)| Tuning {
        thread_workgroup: t.0,
        thread_max_cols: t.1,
        thread_max_cols_without_subgroups: t.2,
        subgroup_workgroup: t.3,
        subgroup_max_cols: t.4,
        streamed_thread_max_cols: t.5,
        row_workgroup: t.6,
        row_workgroup_without_subgroups: t.7,
        max_items: t.8,
        split_min_cols: s.0,
        split_max_rows: s.1,
        split_chunk: s.2,
        workgroup_per_row: s.3,
        split_team: s.4,
        batch_team: s.5,
        batch_tally: s.6,
        loss_tally: s.7,
        split_reverse: s.8,
        batch_rows: s.9,
        split_group_bytes: s.10,
        split_wait: r.0,
        loss_split_wait: r.1,
        backward_split_wait: r.2,
        split_alone: r.3,
        vector: r.4,
        unaligned_items: r.5,
        subgroups: r.6,
        axis_workgroup: r.7,
        axis_lines: r.8,
        axis_min_chunk: r.9,
        axis_vec4_max_inner: r.10,
    })
}

/// Columns around the thresholds the tables draw from: a few, around a `vec4` and a
/// workgroup, and long enough to split or to stream.
fn cols() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 1usize..=12,
        3 => 13usize..=300,
        2 => 301usize..=5000,
        // Not longer: a split in chunks of one element combines a row's partials in each of
        // its invocations, cols x cols work that a software adapter takes seconds over.
        1 => 5001usize..=12_000,
    ]
}

/// Rows for `cols`: at most about 200 000 elements.
fn batch() -> impl Strategy<Value = (usize, usize)> {
    cols().prop_flat_map(|cols| (1usize..=(200_000 / cols).clamp(1, 300), Just(cols)))
}

/// Logits of `rows x cols` from `seed`, with special values in some rows where `specials`:
/// a -inf, a whole row of -inf, a +inf, a NaN, a huge logit (1e30, whose loss f32 holds: one
/// near `f32::MAX` would overflow to +inf, as it should, where the f64 reference does not).
fn input(rows: usize, cols: usize, seed: u64, specials: bool) -> Vec<f32> {
    let mut x = logits(rows, cols, 3.0, seed);
    if specials {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        for _ in 0..rows.min(6) {
            let (r, c) = (rng.random_range(0..rows), rng.random_range(0..cols));
            let row = &mut x[r * cols..][..cols];
            match rng.random_range(0..5) {
                0 => row[c] = f32::NEG_INFINITY,
                1 => row.fill(f32::NEG_INFINITY),
                2 => row[c] = f32::INFINITY,
                3 => row[c] = f32::NAN,
                _ => row[c] = 1e30,
            }
        }
    }
    x
}

/// What a cross-entropy case asks for.
#[derive(Debug, Clone, Copy)]
struct LossCase {
    probabilities: bool,
    weighted: bool,
    smoothing: bool,
    reduction: Reduction,
}

fn loss_case() -> impl Strategy<Value = LossCase> {
    (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::sample::select(&[Reduction::None, Reduction::Mean, Reduction::Sum][..]),
    )
        .prop_map(|(probabilities, weighted, smoothing, reduction)| LossCase {
            probabilities,
            weighted,
            smoothing,
            reduction,
        })
}

/// Index targets for `rows` rows of `cols` classes (every seventh ignored), and probability
/// targets, from `seed`.
fn targets(rows: usize, cols: usize, seed: u64) -> (Vec<i64>, Vec<f32>) {
    (
        index_targets(rows, cols, seed ^ 0x7a67, 7),
        probability_targets(rows, cols, seed ^ 0x9e0b),
    )
}

/// Cross-entropy of `case` on rows of `cols` (or, with `layout`, its lines) against the
/// reference: loss and gradient; along rows the in-place device form too, whose gradient
/// must be the host form's bits where `same_blocks` (the two forms cut the batch alike). Where
/// a batch runs in row blocks, a host form stages each block at the start of a buffer, and
/// chooses its kernel by the block's own rows: a last block of few rows may split where the
/// device form's does not, and rows not a multiple of 4 columns read as `vec4`s start at
/// another place within a `vec4` than in the tensor; both round differently.
fn check_loss(
    ctx: &Context,
    x: &[f32],
    (cols, same_blocks): (usize, bool),
    layout: Option<AxisLayout>,
    case: LossCase,
    seed: u64,
) -> Result<(), TestCaseError> {
    let rows_x = match layout {
        Some(layout) => layout.to_rows(x).unwrap(),
        None => x.to_vec(),
    };
    let rows = rows_x.len() / cols;
    let (idx, probs_rows) = targets(rows, cols, seed);
    let probs = match layout {
        Some(layout) => layout.from_rows(&probs_rows).unwrap(),
        None => probs_rows.clone(),
    };
    let weight: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
    let per_row: Vec<f32> = (0..rows).map(|r| 1.0 + (r % 3) as f32).collect();
    let options = CrossEntropyOptions {
        weight: case.weighted.then_some(&weight[..]),
        label_smoothing: if case.smoothing { 0.1 } else { 0.0 },
        reduction: case.reduction,
        ..Default::default()
    };
    let grad_output = match case.reduction {
        Reduction::None => GradOutput::PerRow(&per_row),
        _ => GradOutput::Scalar(0.5),
    };
    let (targets, targets_rows) = if case.probabilities {
        (
            Targets::Probabilities(&probs),
            Targets::Probabilities(&probs_rows),
        )
    } else {
        (Targets::Indices(&idx), Targets::Indices(&idx))
    };
    let want =
        reference::cross_entropy(&rows_x, cols, targets_rows, &options, grad_output).unwrap();
    let what = format!("cross-entropy {case:?}");
    let Some(layout) = layout else {
        let input = (x, cols, targets, grad_output);
        check_host_and_in_place(ctx, input, &options, (&want, same_blocks), &what);
        return Ok(());
    };
    let got = ctx
        .along(layout)
        .cross_entropy_with_grad(x, targets, &options, grad_output)
        .unwrap();
    let cmp = LOSS_TOLERANCE.compare(&got.loss, &want.loss);
    prop_assert!(cmp.passed(), "{what}: loss {cmp:?}");
    assert_grad_close(&layout.to_rows(&got.grad).unwrap(), &want.grad, &what);
    Ok(())
}

/// The backward `got` of softmax (`log` false) or log-softmax over rows of `cols`, from their
/// output `y` and upstream `dy`, against the reference, within the f32 summation bound of each
/// row's sum ([`Tolerance::compare_backward`]): a row with one huge logit has `p_j = 1`, and its
/// sum's rounding shows whole in `dx_j`.
fn compare_backward(y: &[f32], dy: &[f32], got: &[f32], cols: usize, log: bool) -> Comparison {
    let (want, tolerance) = if log {
        let want = reference::log_softmax_backward(y, dy, cols).unwrap();
        (want, Tolerance::LOG_SOFTMAX)
    } else {
        (
            reference::softmax_backward(y, dy, cols).unwrap(),
            Tolerance::SOFTMAX,
        )
    };
    tolerance.compare_backward_of(got, &want, [y, dy], cols, log)
}

proptest! {
    #![proptest_config(config())]

    /// Softmax, log-softmax, their backward and cross-entropy over rows; now and then on a
    /// device whose storage bindings hold 256 KiB, so that batches run in row blocks.
    #[test]
    fn any_tuning_matches_the_reference_along_rows(
        tuning in tuning(),
        (rows, cols) in batch(),
        seed in any::<u64>(),
        specials in any::<bool>(),
        case in loss_case(),
        small_bindings in proptest::bool::weighted(0.25),
    ) {
        let Some(base) = context() else { return Ok(()) };
        let ctx = if small_bindings {
            bounded_context(base, tuning, 256 << 10, 1 << 20)
        } else {
            tuned(base, tuning)
        };
        let x = input(rows, cols, seed, specials);
        let what = format!("{rows}x{cols}");
        let y = ctx.softmax(&x, cols).unwrap();
        let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&x, cols).unwrap());
        prop_assert!(cmp.passed(), "softmax {}: {:?}", what, cmp);
        let ly = ctx.log_softmax(&x, cols).unwrap();
        let cmp = Tolerance::LOG_SOFTMAX.compare(&ly, &reference::log_softmax(&x, cols).unwrap());
        prop_assert!(cmp.passed(), "log-softmax {}: {:?}", what, cmp);
        let dy = logits(rows, cols, 1.0, seed ^ 0xd7);
        for (log, y) in [(false, &y), (true, &ly)] {
            let got = if log {
                ctx.log_softmax_backward(y, &dy, cols).unwrap()
            } else {
                ctx.softmax_backward(y, &dy, cols).unwrap()
            };
            let cmp = compare_backward(y, &dy, &got, cols, log);
            prop_assert!(cmp.passed(), "backward (log {}) {}: {:?}", log, what, cmp);
        }
        check_loss(&ctx, &x, (cols, !small_bindings), None, case, seed)?;
    }

    /// The same along the middle axis of `[outer, C, inner]`; now and then on a device whose
    /// storage bindings hold 64 KiB, so that batches run in blocks of slabs, and a slab larger
    /// than a binding is `Error::SlabTooLarge` for every op.
    #[test]
    fn any_tuning_matches_the_reference_along_an_axis(
        tuning in tuning(),
        outer in 1usize..=3,
        classes in prop_oneof![1usize..=40, 41usize..=3000],
        inner in prop_oneof![2usize..=9, 10usize..=70],
        seed in any::<u64>(),
        specials in any::<bool>(),
        case in loss_case(),
        small_bindings in proptest::bool::weighted(0.25),
    ) {
        let Some(base) = context() else { return Ok(()) };
        let (ctx, outer) = if small_bindings {
            // Enough slabs for several blocks.
            (bounded_context(base, tuning, 64 << 10, 4 << 20), outer * 4)
        } else {
            (tuned(base, tuning), outer)
        };
        let layout = AxisLayout::from_parts(outer, classes, inner).unwrap();
        let rows_x = input(layout.lines(), classes, seed, specials);
        let x = layout.from_rows(&rows_x).unwrap();
        let along = ctx.along(layout);
        let what = format!("{outer}x{classes}x{inner}");
        let slab_bytes = (classes * inner * 4) as u64;
        let limits = ctx.device().limits();
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        if slab_bytes > limits.max_storage_buffer_binding_size - align {
            let dy = vec![0.0; x.len()];
            let (idx, _) = targets(layout.lines(), classes, seed);
            let results = [
                along.softmax(&x).map(drop),
                along.log_softmax(&x).map(drop),
                along.softmax_backward(&x, &dy).map(drop),
                along.log_softmax_backward(&x, &dy).map(drop),
                along
                    .cross_entropy(&x, Targets::Indices(&idx), &CrossEntropyOptions::default())
                    .map(drop),
            ];
            for result in results {
                prop_assert!(
                    matches!(result, Err(Error::SlabTooLarge { .. })),
                    "{}: {:?}", what, result
                );
            }
            return Ok(());
        }
        let y = along.softmax(&x).unwrap();
        let want = layout.from_rows(&reference::softmax(&rows_x, classes).unwrap()).unwrap();
        let cmp = Tolerance::SOFTMAX.compare(&y, &want);
        prop_assert!(cmp.passed(), "softmax {}: {:?}", what, cmp);
        let ly = along.log_softmax(&x).unwrap();
        let want = layout.from_rows(&reference::log_softmax(&rows_x, classes).unwrap()).unwrap();
        let cmp = Tolerance::LOG_SOFTMAX.compare(&ly, &want);
        prop_assert!(cmp.passed(), "log-softmax {}: {:?}", what, cmp);
        let dy = logits(layout.numel(), 1, 1.0, seed ^ 0xd7);
        let dy_rows = layout.to_rows(&dy).unwrap();
        for (log, y) in [(false, &y), (true, &ly)] {
            let got = if log {
                along.log_softmax_backward(y, &dy).unwrap()
            } else {
                along.softmax_backward(y, &dy).unwrap()
            };
            let [y_rows, got_rows] = [y, &got].map(|v| layout.to_rows(v).unwrap());
            let cmp = compare_backward(&y_rows, &dy_rows, &got_rows, classes, log);
            prop_assert!(cmp.passed(), "backward (log {}) {}: {:?}", log, what, cmp);
        }
        check_loss(&ctx, &x, (classes, true), Some(layout), case, seed)?;
    }
}

proptest! {
    #![proptest_config(config())]

    /// The encode forms on regions of the caller's buffers at any word offset (vec4 kernels
    /// where every operand starts on 16 bytes, scalar ones elsewhere): softmax, then its
    /// backward on the softmax's output region, write their regions and no other word.
    #[test]
    fn any_tuning_keeps_to_its_regions(
        tuning in tuning(),
        (rows, cols) in batch(),
        seed in any::<u64>(),
        [x_at, y_at, dy_at, dx_at] in [0usize..8, 0usize..8, 0usize..8, 0usize..8],
    ) {
        let Some(base) = context() else { return Ok(()) };
        let ctx = tuned(base, tuning);
        let n = rows * cols;
        let x = logits(rows, cols, 3.0, seed);
        let dy = logits(rows, cols, 1.0, seed ^ 0xd7);
        // Inputs in one buffer, outputs in another: x, then dy past it.
        let dy_at = x_at + n + dy_at;
        let inputs = Arena::new(&ctx, dy_at + n + 8, &[(x_at, &bits(&x)), (dy_at, &bits(&dy))], usage());
        let outputs = Arena::new(&ctx, y_at + n + 8, &[], usage());
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode_softmax(&mut encoder, inputs.region(x_at, n), outputs.region(y_at, n), rows, cols)
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
        // The backward reads y from the outputs' buffer, so it writes into another one.
        let grads = Arena::new(&ctx, dx_at + n + 8, &[], usage());
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode_softmax_backward(
            &mut encoder,
            outputs.region(y_at, n),
            inputs.region(dy_at, n),
            grads.region(dx_at, n),
            rows,
            cols,
        )
        .unwrap();
        ctx.queue().submit([encoder.finish()]);
        let what = format!("{rows}x{cols}, x at {x_at}, y at {y_at}, dy at {dy_at}, dx at {dx_at}");
        inputs.written(&ctx, &[], &what);
        let y = outputs.written(&ctx, &[(y_at, n)], &what).remove(0);
        let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&x, cols).unwrap());
        prop_assert!(cmp.passed(), "softmax {}: {:?}", what, cmp);
        let dx = grads.written(&ctx, &[(dx_at, n)], &what).remove(0);
        let cmp = compare_backward(&y, &dy, &dx, cols, false);
        prop_assert!(cmp.passed(), "softmax backward {}: {:?}", what, cmp);
    }

    /// Cross-entropy's encode forms on regions at any word offset, along rows (`inner` 1) and
    /// along the middle axis of `[outer, C, inner]`: index or probability targets, the gradient
    /// into a region, over the logits or not at all, the upstream gradient known when recorded
    /// or read from a region, a reduced loss written or copied into its region. The loss and
    /// gradient match the reference, and no other word of any buffer changes.
    #[test]
    fn any_tuning_keeps_cross_entropy_to_its_regions(
        tuning in tuning(),
        (rows, cols) in batch(),
        inner in prop_oneof![Just(1usize), 2usize..=9, 10usize..=40],
        seed in any::<u64>(),
        case in loss_case(),
        (grad_to, upstream_on_device, loss_copied) in (0u8..3, any::<bool>(), any::<bool>()),
        [x_at, t_at, g_at, l_at, d_at] in [0usize..8, 0usize..8, 0usize..8, 0usize..8, 0usize..8],
    ) {
        let Some(base) = context() else { return Ok(()) };
        let ctx = tuned(base, tuning);
        let outer = rows.div_ceil(inner);
        let layout = AxisLayout::from_parts(outer, cols, inner).unwrap();
        let (lines, n) = (layout.lines(), layout.numel());
        let rows_x = input(lines, cols, seed, true);
        let x = layout.from_rows(&rows_x).unwrap();
        let (idx, probs_rows) = targets(lines, cols, seed);
        let weight: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
        let options = CrossEntropyOptions {
            weight: case.weighted.then_some(&weight[..]),
            label_smoothing: if case.smoothing { 0.1 } else { 0.0 },
            reduction: case.reduction,
            ..Default::default()
        };
        let reduced = case.reduction != Reduction::None;
        // Per line for `None`, one value otherwise; the reference takes it per line for `None`
        // either way.
        let upstream: Vec<f32> = if reduced {
            vec![0.5]
        } else if upstream_on_device {
            (0..lines).map(|r| 1.0 + (r % 3) as f32).collect()
        } else {
            vec![0.5; lines]
        };
        let (target_words, targets_rows, encoding) = if case.probabilities {
            let probs = layout.from_rows(&probs_rows).unwrap();
            (bits(&probs), Targets::Probabilities(&probs_rows), TargetEncoding::Probabilities)
        } else {
            let words = idx.iter().map(|&t| t as i32 as u32).collect();
            (words, Targets::Indices(&idx), TargetEncoding::Indices)
        };
        let want = reference::cross_entropy(
            &rows_x,
            cols,
            targets_rows,
            &options,
            if reduced { GradOutput::Scalar(0.5) } else { GradOutput::PerRow(&upstream) },
        )
        .unwrap();
        let loss_len = want.loss.len();
        let in_place = grad_to == 2;
        // Operands read alone share one buffer; the logits move to their own when written over.
        let t_at = x_at + n + t_at;
        let g_at = t_at + target_words.len() + g_at;
        let x_words = bits(&x);
        let mut read_parts = vec![(t_at, &target_words[..])];
        let upstream_words = bits(&upstream);
        if upstream_on_device {
            read_parts.push((g_at, &upstream_words[..]));
        }
        if !in_place {
            read_parts.push((x_at, &x_words[..]));
        }
        let inputs = Arena::new(&ctx, g_at + upstream.len() + 8, &read_parts, usage());
        let logits_own = Arena::new(&ctx, x_at + n + 8, &[(x_at, &x_words[..])], usage());
        let logits_buffer = if in_place { &logits_own } else { &inputs };
        let loss_usage = if reduced && loss_copied { wgpu::BufferUsages::COPY_DST } else { usage() };
        let losses = Arena::new(&ctx, l_at + loss_len + 8, &[], loss_usage);
        let grads = Arena::new(&ctx, d_at + n + 8, &[], usage());
        let grad = match grad_to {
            0 => GradDestination::None,
            1 => GradDestination::Buffer(grads.region(d_at, n)),
            _ => GradDestination::InPlace,
        };
        let buffers = CrossEntropyBuffers {
            logits: logits_buffer.region(x_at, n),
            targets: inputs.region(t_at, target_words.len()),
            target_encoding: encoding,
            loss: losses.region(l_at, loss_len),
            grad,
            rows: lines,
        };
        let grad_output = if upstream_on_device {
            DeviceGradOutput::Region(inputs.region(g_at, upstream.len()))
        } else {
            DeviceGradOutput::Scalar(0.5)
        };
        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        if inner == 1 {
            loss_fn.encode(&mut encoder, buffers, grad_output).unwrap();
        } else {
            loss_fn.encode_along(&mut encoder, layout, buffers, grad_output).unwrap();
        }
        ctx.queue().submit([encoder.finish()]);
        let what = format!(
            "{outer}x{cols}x{inner} {case:?}, gradient {grad:?}, upstream on device \
             {upstream_on_device}, loss copied {loss_copied}, logits at {x_at}, targets at \
             {t_at}, upstream at {g_at}, loss at {l_at}, gradient at {d_at}"
        );
        inputs.written(&ctx, &[], &what);
        let loss = losses.written(&ctx, &[(l_at, loss_len)], &what).remove(0);
        let cmp = LOSS_TOLERANCE.compare(&loss, &want.loss);
        prop_assert!(cmp.passed(), "{}: loss {:?}", what, cmp);
        let got_grad = match grad_to {
            0 => None,
            1 => Some(grads.written(&ctx, &[(d_at, n)], &what).remove(0)),
            _ => Some(logits_own.written(&ctx, &[(x_at, n)], &what).remove(0)),
        };
        if grad_to != 1 {
            grads.written(&ctx, &[], &what);
        }
        if !in_place {
            logits_own.written(&ctx, &[], &what);
        }
        if let Some(got) = got_grad {
            assert_grad_close(&layout.to_rows(&got).unwrap(), &want.grad, &what);
        }
    }
}
