//! Writing one unit file: tensors copied verbatim in bounded chunks, or quantized chunk by chunk.

use crate::checkpoint::{Checkpoint, TensorLoc};
use crate::error::Result;
use crate::layout::RowOrder;
use crate::quant::{self, Compression};
use crate::writer::{AlignedWriter, WrittenFile};

use super::plan::{Source, UnitPlan};
use super::COPY_CHUNK;

pub(super) fn write_unit(
    ckpt: &Checkpoint,
    up: &UnitPlan<'_>,
    buf: &mut Vec<u8>,
) -> Result<WrittenFile> {
    let mut w = AlignedWriter::with_layout(&up.path, up.header.clone())?;
    let mut qbuf = QuantBuffers::default();
    for p in &up.pieces {
        let loc = p.loc;
        match p.source {
            Source::Copy => {
                let mut done = 0u64;
                while done < loc.len {
                    let n = (loc.len - done).min(COPY_CHUNK as u64) as usize;
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    read_piece(ckpt, loc, p.order, done, &mut buf[..n])?;
                    w.write_data(&buf[..n])?;
                    done += n as u64;
                }
            }
            Source::Scales(scheme) => {
                write_quantized(ckpt, loc, p.order, scheme, false, &mut w, &mut qbuf)?
            }
            Source::Codes(scheme) => {
                write_quantized(ckpt, loc, p.order, scheme, true, &mut w, &mut qbuf)?
            }
        }
    }
    w.finish()
}

/// Reads bytes `start..start + buf.len()` of a tensor as the split stores it: the checkpoint's
/// bytes, or with a row order, its row blocks in that order.
fn read_piece(
    ckpt: &Checkpoint,
    loc: &TensorLoc,
    order: Option<&RowOrder>,
    start: u64,
    buf: &mut [u8],
) -> Result<()> {
    let Some(o) = order else {
        return ckpt.read_range(loc, start, buf);
    };
    // The plan checked that the rows divide into the blocks evenly.
    let block = loc.len / o.order.len() as u64;
    let mut done = 0usize;
    while done < buf.len() {
        let at = start + done as u64;
        let (i, within) = ((at / block) as usize, at % block);
        let n = ((block - within) as usize).min(buf.len() - done);
        let from = o.order[i] as u64 * block + within;
        ckpt.read_range(loc, from, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}

/// Elements of a source tensor quantized per step (a multiple of [`QUANT_BLOCK`]).
const QUANT_CHUNK_ELEMS: usize = 1 << 20;

/// Buffers reused across the quantized tensors of a unit.
#[derive(Default)]
struct QuantBuffers {
    raw: Vec<u8>,
    values: Vec<f32>,
    codes: Vec<u8>,
    scales: Vec<f32>,
}

/// Streams one quantized tensor's scales (`codes == false`) or codes into `w`, reading and
/// converting the source in block-aligned chunks of [`QUANT_CHUNK_ELEMS`] elements. Scales and
/// codes are computed by the same function on the same chunks, so the two passes agree.
fn write_quantized(
    ckpt: &Checkpoint,
    loc: &TensorLoc,
    order: Option<&RowOrder>,
    scheme: Compression,
    codes: bool,
    w: &mut AlignedWriter,
    b: &mut QuantBuffers,
) -> Result<()> {
    let elem = loc.dtype.size_bytes() as u64;
    let numel = loc.len / elem;
    let mut done = 0u64;
    while done < numel {
        let n = (numel - done).min(QUANT_CHUNK_ELEMS as u64) as usize;
        let bytes = n * elem as usize;
        if b.raw.len() < bytes {
            b.raw.resize(bytes, 0);
        }
        read_piece(ckpt, loc, order, done * elem, &mut b.raw[..bytes])?;
        b.values.clear();
        let ok = quant::to_f32(loc.dtype, &b.raw[..bytes], &mut b.values);
        debug_assert!(ok, "only float dtypes are planned for quantization");
        b.codes.clear();
        b.scales.clear();
        if codes {
            quant::quantize_append_parallel(scheme, &b.values, &mut b.codes, &mut b.scales);
            w.write_data(&b.codes)?;
        } else {
            quant::block_scales(scheme, &b.values, &mut b.scales);
            b.codes
                .extend(b.scales.iter().flat_map(|s| s.to_le_bytes()));
            w.write_data(&b.codes)?;
        }
        done += n as u64;
    }
    Ok(())
}
