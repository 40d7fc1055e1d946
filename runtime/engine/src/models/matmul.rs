//! CPU matrix products into buffers the caller owns, through the `gemm` crate that candle's CPU
//! matmul runs on, and per-thread scratch buffers that outlive a call.
//!
//! candle's matmul returns a fresh, zeroed output every time. For a product that is only an
//! intermediate (a tap of a banded conv, a band of an MLP's hidden layer) that costs an
//! allocation the kernel must then fault in page by page, and often a second pass to add the
//! product to where it belongs: on the detector's maps gemm ran at about half its speed writing
//! into fresh pages. Here products land in reused buffers or accumulate straight into the
//! final output.

use std::cell::RefCell;

use gemm::Parallelism;

/// A strided `rows x cols` matrix inside `data`: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A `rows x cols` matrix inside `data` with contiguous rows `rs` apart (`rs >= cols`, so no two
/// elements share memory).
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

/// Elements from the first to one past the last element of a strided matrix.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

fn as_isize(v: usize) -> candle_core::Result<isize> {
    isize::try_from(v).map_err(|_| candle_core::Error::Msg(format!("stride {v} too large")))
}

/// `dst = lhs * rhs`, or `dst += lhs * rhs` with `accumulate`, on `threads` rayon threads (1:
/// on the calling thread only, for callers that are rayon tasks themselves). Shapes and bounds
/// are checked, so a bad view is an error, never an access outside the slices.
pub fn matmul_into(
    dst: MatMut<'_>,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    threads: usize,
) -> candle_core::Result<()> {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    if lhs.rows != m || rhs.rows != k || rhs.cols != n {
        candle_core::bail!(
            "matmul_into: [{m}, {n}] = [{}, {k}] x [{}, {}]",
            lhs.rows,
            rhs.rows,
            rhs.cols
        );
    }
    let fits = |len: usize, s: Option<usize>| s.is_some_and(|s| s <= len);
    if dst.rs < n
        || !fits(dst.data.len(), span(m, n, dst.rs, 1))
        || !fits(lhs.data.len(), span(m, k, lhs.rs, lhs.cs))
        || !fits(rhs.data.len(), span(k, n, rhs.rs, rhs.cs))
    {
        candle_core::bail!("matmul_into: a view reaches past its buffer");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let (dst_rs, lhs_rs, lhs_cs, rhs_rs, rhs_cs) = (
        as_isize(dst.rs)?,
        as_isize(lhs.rs)?,
        as_isize(lhs.cs)?,
        as_isize(rhs.rs)?,
        as_isize(rhs.cs)?,
    );
    // SAFETY: every element gemm reads or writes, `(r, c)` with `r < rows` and `c < cols` of
    // each view, lies inside that view's slice (checked above). `dst`'s rows do not overlap
    // (`rs >= cols`, unit column stride), and `dst` is borrowed mutably, so it aliases neither
    // operand. With `accumulate` gemm computes `1 * dst + 1 * product`, otherwise it writes
    // `product` without reading `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst_rs,
            accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Scratch buffers: each thread keeps one per slot and reuses it from call to call, so a
/// kernel's working set is faulted in once rather than on every call.
#[derive(Clone, Copy, Debug)]
pub enum Scratch {
    /// The gathered input of a banded conv.
    Gather,
    /// The products of a fused pair of pointwise convs, all bands.
    PairOut,
    /// One band of the hidden layer of a fused pair of pointwise convs.
    PairHidden,
}

/// Above this many elements a scratch buffer is allocated for the call only: keeping it would
/// pin that much memory to the thread for good.
const MAX_KEPT_SCRATCH: usize = 16 * 1024 * 1024;

thread_local! {
    static SCRATCH: [RefCell<Vec<f32>>; 3] = const {
        [const { RefCell::new(Vec::new()) }; 3]
    };
}

/// Runs `f` on `len` elements of this thread's `slot` buffer; their contents are whatever the
/// last user left. A slot already in use on this thread (a rayon task that stole work while
/// its caller held the slot) gets a fresh buffer instead.
pub fn with_scratch<R>(slot: Scratch, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if len > MAX_KEPT_SCRATCH {
        return f(&mut vec![0f32; len]);
    }
    SCRATCH.with(|slots| match slots[slot as usize].try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                // Dropped first: growing in place would copy contents nobody needs.
                *buf = Vec::new();
                *buf = vec![0f32; len];
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn strided_product_and_accumulation() {
        let (m, k, n) = (5, 7, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        let want = naive(&a, &b, m, k, n);
        // Into rows 12 apart, at column offset 2.
        let mut dst = vec![9f32; 12 * m];
        let view = |d: &mut [f32]| -> Vec<f32> {
            (0..m)
                .flat_map(|i| d[i * 12 + 2..i * 12 + 2 + n].to_vec())
                .collect()
        };
        let lhs = Mat {
            data: &a,
            rows: m,
            cols: k,
            rs: k,
            cs: 1,
        };
        // rhs as the transpose of a column-major copy.
        let bt: Vec<f32> = (0..n)
            .flat_map(|j| (0..k).map(|p| b[p * n + j]).collect::<Vec<_>>())
            .collect();
        let rhs = Mat {
            data: &bt,
            rows: k,
            cols: n,
            rs: 1,
            cs: k,
        };
        let out = MatMut {
            data: &mut dst[2..],
            rows: m,
            cols: n,
            rs: 12,
        };
        matmul_into(out, lhs, rhs, false, 1).expect("matmul");
        assert_eq!(view(&mut dst), want);
        assert_eq!(dst[0], 9.0, "outside the view is untouched");
        let out = MatMut {
            data: &mut dst[2..],
            rows: m,
            cols: n,
            rs: 12,
        };
        matmul_into(out, lhs, rhs, true, 2).expect("accumulate");
        let twice: Vec<f32> = want.iter().map(|v| 2.0 * v).collect();
        assert_eq!(view(&mut dst), twice);
    }

    #[test]
    fn views_past_the_buffer_are_errors() {
        let a = vec![0f32; 6];
        let mut d = vec![0f32; 6];
        let lhs = Mat {
            data: &a,
            rows: 2,
            cols: 3,
            rs: 3,
            cs: 1,
        };
        let rhs = Mat {
            data: &a,
            rows: 3,
            cols: 2,
            rs: 3,
            cs: 1,
        };
        let out = MatMut {
            data: &mut d,
            rows: 2,
            cols: 2,
            rs: 2,
        };
        assert!(matmul_into(out, lhs, rhs, false, 1).is_err());
    }
}
