//! Parameter groups of fine-tuning: the official `optim_factory.get_parameter_groups` (BEiT's,
//! used by `classification_layer_decay`) with `LayerDecayValueAssigner`, and timm's
//! `add_weight_decay` (the DeiT transfer and semi-supervised recipes).

use crate::params::ParamStore;
use crate::train::optim::ScaledGroup;

/// `get_num_layer_for_vit`: `cls_token`, `mask_token`, `pos_embed` and `patch_embed.*` are
/// layer 0, `blocks.i.*` layer i + 1, `rel_pos_bias.*` and everything else (final norm,
/// `fc_norm`, the head) layer `num_max_layer - 1` = depth + 1.
pub fn layer_id_for_vit(name: &str, num_max_layer: usize) -> usize {
    if matches!(name, "cls_token" | "mask_token" | "pos_embed") || name.starts_with("patch_embed") {
        0
    } else if name.starts_with("rel_pos_bias") {
        num_max_layer - 1
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        match rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => i + 1,
            None => num_max_layer - 1,
        }
    } else {
        num_max_layer - 1
    }
}

/// The official `get_num_layer_for_swin`: `cls_token`, `mask_token`, `pos_embed` and
/// `patch_embed.*` are layer 0; `layers.i.blocks.j.*` is layer `sum(depths[..i]) + j + 1`;
/// `layers.i.downsample.*` (the patch merging at the end of stage i) takes the layer of the
/// stage's last block, `sum(depths[..=i])`; `rel_pos_bias.*` and everything else (final norm,
/// head, `absolute_pos_embed`) layer `num_max_layer - 1` = sum(depths) + 1.
pub fn layer_id_for_swin(name: &str, num_max_layer: usize, depths: &[usize]) -> usize {
    if matches!(name, "cls_token" | "mask_token" | "pos_embed") || name.starts_with("patch_embed") {
        return 0;
    }
    if name.starts_with("rel_pos_bias") {
        return num_max_layer - 1;
    }
    let Some(rest) = name.strip_prefix("layers") else {
        return num_max_layer - 1;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    // parts[0] is what followed "layers" up to the first dot ("" for "layers.i...").
    let stage = parts.get(1).and_then(|i| i.parse::<usize>().ok());
    let Some(stage) = stage.filter(|&i| i < depths.len()) else {
        return num_max_layer - 1;
    };
    let block = if name.contains("blocks") {
        match parts.get(3).and_then(|j| j.parse::<usize>().ok()) {
            Some(j) => j,
            None => return num_max_layer - 1,
        }
    } else {
        depths[stage].saturating_sub(1)
    };
    depths[..stage].iter().sum::<usize>() + block + 1
}

/// Which layer-id rule a model follows (`LayerDecayValueAssigner(values, is_swin, depths)`).
#[derive(Debug, Clone, PartialEq)]
pub enum LayerIds {
    /// `get_num_layer_for_vit` for a ViT of this depth.
    Vit { depth: usize },
    /// `get_num_layer_for_swin` with these stage depths (num_layers = their sum).
    Swin { depths: Vec<usize> },
}

impl LayerIds {
    /// `get_num_layers()`: the depth of a ViT, the total number of blocks of a Swin.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Vit { depth } => *depth,
            Self::Swin { depths } => depths.iter().sum(),
        }
    }

    pub fn layer_id(&self, name: &str, num_max_layer: usize) -> usize {
        match self {
            Self::Vit { .. } => layer_id_for_vit(name, num_max_layer),
            Self::Swin { depths } => layer_id_for_swin(name, num_max_layer, depths),
        }
    }
}

extern "C" {
    /// The C library's `pow`, which CPython's `float ** int` calls: Rust's `powf`/`powi` may
    /// round differently in the last bit (0.65² gave 0.42250000000000004, Python 0.4225).
    fn pow(x: f64, y: f64) -> f64;
}

/// The assigner's values: `layer_decay ** (depth + 1 - i)` for i in 0..=depth+1, bit for bit as
/// Python computes them.
pub fn layer_scales(layer_decay: f64, depth: usize) -> Vec<f64> {
    (0..depth + 2)
        // SAFETY: a pure libm function on plain numbers.
        .map(|i| unsafe { pow(layer_decay, (depth + 1 - i) as f64) })
        .collect()
}

/// The official `get_parameter_groups(model, weight_decay, skip_list, get_num_layer,
/// get_layer_scale)`: every trainable parameter goes to `no_decay` when it is 1-D, a bias or in
/// `skip_list`, else to `decay`; with layer decay (`depth` given and `layer_decay < 1`, as the
/// official script builds the assigner only then) the group is `layer_<id>_<decay|no_decay>`
/// with lr scale `layer_decay^(depth + 1 - id)`. Groups keep the order of first appearance,
/// parameters the model's order.
pub fn get_parameter_groups(
    ps: &ParamStore,
    skip_list: &[&str],
    layer_decay: Option<(f64, usize)>,
) -> Vec<ScaledGroup> {
    get_parameter_groups_for(
        ps,
        skip_list,
        layer_decay.map(|(ld, depth)| (ld, LayerIds::Vit { depth })),
    )
}

/// [`get_parameter_groups`] with the layer ids of a ViT or a Swin (the official assigner with
/// `is_swin=True, depths=model.depths` for a Swin).
pub fn get_parameter_groups_for(
    ps: &ParamStore,
    skip_list: &[&str],
    layer_decay: Option<(f64, LayerIds)>,
) -> Vec<ScaledGroup> {
    let assigner = layer_decay
        .filter(|(ld, _)| *ld < 1.0)
        .map(|(ld, ids)| (layer_scales(ld, ids.num_layers()), ids));
    let mut groups: Vec<ScaledGroup> = Vec::new();
    for (i, p) in ps.params().iter().enumerate() {
        if !p.trainable {
            continue;
        }
        let no_decay = p.tensor.dim() == 1
            || p.name.ends_with(".bias")
            || skip_list.contains(&p.name.as_str());
        let base = if no_decay { "no_decay" } else { "decay" };
        let (name, scale) = match &assigner {
            Some((values, ids)) => {
                let id = ids.layer_id(&p.name, values.len());
                (format!("layer_{id}_{base}"), values[id])
            }
            None => (base.to_string(), 1.0),
        };
        match groups.iter_mut().find(|g| g.name == name) {
            Some(g) => g.indices.push(i),
            None => groups.push(ScaledGroup {
                name,
                indices: vec![i],
                lr_scale: scale,
                weight_decay: !no_decay,
            }),
        }
    }
    groups
}

/// The official groups as JSON (`{"layer_0_no_decay": {"weight_decay": 0.0, "params": [...],
/// "lr_scale": ...}, ...}`, what `get_parameter_groups` prints), with `weight_decay` filled in.
pub fn groups_json(
    ps: &ParamStore,
    groups: &[ScaledGroup],
    weight_decay: f64,
) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for g in groups {
        let names: Vec<&str> = g
            .indices
            .iter()
            .map(|&i| ps.params()[i].name.as_str())
            .collect();
        m.insert(
            g.name.clone(),
            serde_json::json!({
                "weight_decay": if g.weight_decay { weight_decay } else { 0.0 },
                "params": names,
                "lr_scale": g.lr_scale,
            }),
        );
    }
    serde_json::Value::Object(m)
}
