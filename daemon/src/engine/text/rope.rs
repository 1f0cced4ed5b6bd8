//! Rotary position embedding tables: cos and sin per position, grown on
//! demand, and LongRoPE's second set that a sequence switches to past its
//! original context.

use candle_core::{DType, Device, Result, Tensor};

/// Rotary embedding tables, grown on demand: a model may allow a million
/// positions, while requests use a few thousand.
pub struct Rope {
    short: RopeTable,
    /// LongRoPE's other frequencies, and the sequence length past which
    /// transformers switches to them (`original_max_position_embeddings`):
    /// a step whose furthest position is beyond it rotates by these.
    long: Option<(RopeTable, usize)>,
}

struct RopeTable {
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (LongRoPE's attention factor).
    scale: f32,
    cos: Tensor,
    sin: Tensor,
}

const ROPE_CHUNK: usize = 4096;

impl RopeTable {
    fn new(inv_freq: Vec<f32>, scale: f32, dtype: DType, device: &Device) -> Result<Self> {
        let (cos, sin) = rope_tables(&inv_freq, scale, ROPE_CHUNK, dtype, device)?;
        Ok(RopeTable {
            inv_freq,
            scale,
            cos,
            sin,
        })
    }

    fn ensure(&mut self, positions: usize) -> Result<()> {
        let have = self.cos.dim(0)?;
        if positions > have {
            let size = positions.div_ceil(ROPE_CHUNK) * ROPE_CHUNK;
            let (cos, sin) = rope_tables(
                &self.inv_freq,
                self.scale,
                size,
                self.cos.dtype(),
                self.cos.device(),
            )?;
            self.cos = cos;
            self.sin = sin;
        }
        Ok(())
    }
}

impl Rope {
    pub fn new(inv_freq: Vec<f32>, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Rope {
            short: RopeTable::new(inv_freq, 1.0, dtype, device)?,
            long: None,
        })
    }

    /// LongRoPE: `short` frequencies up to `switch` positions, `long` ones
    /// past it, both tables scaled by `scale`.
    pub fn longrope(
        short: Vec<f32>,
        long: Vec<f32>,
        switch: usize,
        scale: f32,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Rope {
            short: RopeTable::new(short, scale, dtype, device)?,
            long: Some((RopeTable::new(long, scale, dtype, device)?, switch)),
        })
    }

    /// LongRoPE's switch: the sequence length past which it rotates by the
    /// long factors.
    pub(super) fn switch(&self) -> Option<usize> {
        self.long.as_ref().map(|(_, switch)| *switch)
    }

    /// How many channels of a head this rotates.
    pub fn dims(&self) -> usize {
        2 * self.short.inv_freq.len()
    }

    /// The table for a step whose furthest position is `end - 1`.
    fn table(&mut self, end: usize) -> Result<&RopeTable> {
        let table = match &mut self.long {
            Some((long, switch)) if end > *switch => long,
            _ => &mut self.short,
        };
        table.ensure(end)?;
        Ok(table)
    }

    /// cos and sin for `len` positions of one sequence from `offset`.
    pub(super) fn span(&mut self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let table = self.table(offset + len)?;
        Ok((
            table.cos.narrow(0, offset, len)?,
            table.sin.narrow(0, offset, len)?,
        ))
    }

    /// cos and sin `[batch, 1, dims / 2]` for one position per sequence.
    pub(super) fn at(&mut self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.short.inv_freq.len();
        let batch = positions.len();
        let (cos, sin) = if self.long.is_none() {
            // One table: a single gather, done where the table is.
            let furthest = positions.iter().max().map_or(0, |p| *p as usize + 1);
            self.short.ensure(furthest)?;
            let index = Tensor::new(positions, self.short.cos.device())?;
            (
                self.short.cos.index_select(&index, 0)?,
                self.short.sin.index_select(&index, 0)?,
            )
        } else {
            // LongRoPE: each sequence's own table by its length.
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for &p in positions {
                let (c, s) = self.span(p as usize, 1)?;
                cos.push(c);
                sin.push(s);
            }
            (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?)
        };
        Ok((
            cos.reshape((batch, 1, half))?,
            sin.reshape((batch, 1, half))?,
        ))
    }
}

fn rope_tables(
    inv_freq: &[f32],
    scale: f32,
    positions: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let freqs = Tensor::new(inv_freq, device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let angles = t.broadcast_mul(&freqs.reshape((1, inv_freq.len()))?)?;
    let (cos, sin) = if scale == 1.0 {
        (angles.cos()?, angles.sin()?)
    } else {
        (
            (angles.cos()? * scale as f64)?,
            (angles.sin()? * scale as f64)?,
        )
    };
    Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
}
