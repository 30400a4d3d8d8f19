//! timm's `RandomErasing` on one normalised CHW image (`timm.data.random_erasing`), as
//! `create_transform` builds it: `RandomErasing(reprob, mode=remode, max_count=recount)`, area
//! 0.02..1/3 of the image divided by the count, log-uniform aspect ratio in [0.3, 1/0.3].

use anyhow::{ensure, Result};

use super::config::EraseMode;
use super::draws::Draws;

#[derive(Debug, Clone, PartialEq)]
pub struct RandomErasing {
    pub probability: f64,
    pub min_area: f64,
    pub max_area: f64,
    /// `(ln(min_aspect), ln(max_aspect))`.
    pub log_aspect_ratio: (f64, f64),
    pub min_count: usize,
    pub max_count: usize,
    pub mode: EraseMode,
}

impl RandomErasing {
    /// `RandomErasing(probability, mode=mode, max_count=count)` with timm's other defaults.
    pub fn new(probability: f64, mode: EraseMode, count: usize) -> Result<Self> {
        ensure!(count >= 1, "random-erasing count must be at least 1");
        let min_aspect: f64 = 0.3;
        Ok(Self {
            probability,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            log_aspect_ratio: (min_aspect.ln(), (1.0 / min_aspect).ln()),
            min_count: 1,
            max_count: count,
            mode,
        })
    }

    /// `RandomErasing._erase` on `img` (`[c, h, w]` row-major): `random() > p` skips; the count
    /// (`randint(min, max)` unless they are equal); per box up to 10 tries of `uniform` area ×
    /// `exp(uniform)` aspect, `round` (half to even) of the sides, accepted when strictly
    /// smaller than the image; then `randint` top and left and the values of the mode.
    pub fn apply_with(
        &self,
        img: &mut [f32],
        c: usize,
        h: usize,
        w: usize,
        draws: &mut impl Draws,
    ) {
        assert_eq!(
            img.len(),
            c * h * w,
            "image buffer does not match {c}x{h}x{w}"
        );
        if draws.random() > self.probability {
            return;
        }
        let area = (h * w) as f64;
        let count = if self.min_count == self.max_count {
            self.min_count
        } else {
            draws.randint(self.min_count as i64, self.max_count as i64) as usize
        };
        for _ in 0..count {
            for _attempt in 0..10 {
                let target_area = draws.uniform(self.min_area, self.max_area) * area / count as f64;
                let aspect = draws
                    .uniform(self.log_aspect_ratio.0, self.log_aspect_ratio.1)
                    .exp();
                let eh = (target_area * aspect).sqrt().round_ties_even() as usize;
                let ew = (target_area / aspect).sqrt().round_ties_even() as usize;
                if ew < w && eh < h {
                    let top = draws.randint(0, (h - eh) as i64) as usize;
                    let left = draws.randint(0, (w - ew) as i64) as usize;
                    let values = match self.mode {
                        EraseMode::Pixel => draws.normal_f32(c * eh * ew),
                        EraseMode::Rand => draws.normal_f32(c),
                        EraseMode::Const => Vec::new(),
                    };
                    random_erasing_with(img, c, h, w, top, left, eh, ew, self.mode, &values);
                    break;
                }
            }
        }
    }
}

/// Writes one erased box: `img[:, top:top+eh, left:left+ew] = values` where `values` holds
/// `c·eh·ew` values (pixel mode, CHW order), `c` values (rand mode, one per channel) or none
/// (const mode: zeros).
#[allow(clippy::too_many_arguments)]
pub fn random_erasing_with(
    img: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    top: usize,
    left: usize,
    eh: usize,
    ew: usize,
    mode: EraseMode,
    values: &[f32],
) {
    assert!(
        top + eh <= h && left + ew <= w,
        "erased box outside the image"
    );
    for ch in 0..c {
        for y in 0..eh {
            for x in 0..ew {
                let v = match mode {
                    EraseMode::Pixel => values[(ch * eh + y) * ew + x],
                    EraseMode::Rand => values[ch],
                    EraseMode::Const => 0.0,
                };
                img[(ch * h + top + y) * w + left + x] = v;
            }
        }
    }
}
