//! Named recipes (`--preset`) and TOML option files (`--config`) of `ibot train` / `ibot demo`,
//! expanded into command-line options before clap parses them (so explicit options win).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Named recipes, as argument lists.
pub const PRESETS: &[(&str, &str, &[&str])] = &[
    (
        "vit_small_800ep",
        "ViT-S/16, 800 epochs, 2x224 + 10x96 crops: the official README recipe (75.2% k-NN on ImageNet)",
        &[
            "--arch", "vit_small", "--patch_size", "16", "--teacher_temp", "0.07", "--warmup_teacher_temp_epochs", "30",
            "--norm_last_layer", "false", "--epochs", "800", "--batch_size_per_gpu", "64", "--shared_head", "true",
            "--out_dim", "8192", "--local_crops_number", "10", "--global_crops_scale", "0.25", "1",
            "--local_crops_scale", "0.05", "0.25", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2",
        ],
    ),
    (
        "swin_tiny_14_300ep",
        "Swin-T/14 (4-px patches, window 14), 300 epochs, 2x224 + 10x96 crops, masking from epoch 50: the official README recipe (76.2% k-NN on ImageNet; run there on 40 GPUs, so 26 per GPU was 1040 per step)",
        &[
            "--arch", "swin_tiny", "--patch_size", "4", "--window_size", "14", "--teacher_temp", "0.07",
            "--warmup_teacher_temp_epochs", "30", "--norm_last_layer", "false", "--epochs", "300",
            "--batch_size_per_gpu", "26", "--shared_head", "true", "--out_dim", "8192", "--local_crops_number", "10",
            "--global_crops_scale", "0.25", "1", "--local_crops_scale", "0.05", "0.25", "--pred_ratio", "0", "0.3",
            "--pred_ratio_var", "0", "0.2", "--pred_start_epoch", "50",
        ],
    ),
    (
        "swin_tiny_7_300ep",
        "Swin-T/7 (4-px patches, window 7), 300 epochs: the README gives only `swin_tiny teacher 16 --patch_size 4 --window_size 7` (16 GPUs) for it, its full arguments being in a linked args file, so this is the Swin-T/14 recipe with window 7 (the README's model reached 75.3% k-NN)",
        &[
            "--arch", "swin_tiny", "--patch_size", "4", "--window_size", "7", "--teacher_temp", "0.07",
            "--warmup_teacher_temp_epochs", "30", "--norm_last_layer", "false", "--epochs", "300",
            "--batch_size_per_gpu", "26", "--shared_head", "true", "--out_dim", "8192", "--local_crops_number", "10",
            "--global_crops_scale", "0.25", "1", "--local_crops_scale", "0.05", "0.25", "--pred_ratio", "0", "0.3",
            "--pred_ratio_var", "0", "0.2", "--pred_start_epoch", "50",
        ],
    ),
    (
        "fmnist_tiny",
        "a 4-block, 128-wide ViT with 8-pixel patches on 32-pixel crops: Fashion-MNIST in minutes on a CPU",
        &[
            "--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--depth", "4", "--embed_dim", "128",
            "--num_heads", "4", "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "4",
            "--global_crops_scale", "0.4", "1", "--local_crops_scale", "0.1", "0.4", "--out_dim", "512",
            "--patch_out_dim", "512", "--head_hidden_dim", "512", "--head_bottleneck_dim", "128", "--shared_head",
            "true", "--norm_last_layer", "true", "--batch_size_per_gpu", "128", "--epochs", "4", "--warmup_epochs",
            "1", "--warmup_teacher_temp_epochs", "1", "--teacher_temp", "0.04", "--lr", "0.0015", "--min_lr", "1e-5",
            "--momentum_teacher", "0.95", "--drop_path", "0.0", "--pred_ratio", "0", "0.3", "--pred_ratio_var", "0", "0.2",
            "--freeze_last_layer", "0", "--saveckp_freq", "0", "--use_fp16", "false",
        ],
    ),
];

/// Index in `argv` (program name first) of the subcommand: the first argument that is not an
/// option or the value of a global option (`--threads N`). `None` when there is none.
pub fn subcommand_position(argv: &[String]) -> Option<usize> {
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        if a == "--threads" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

/// Expands `--preset NAME` and `--config FILE` (TOML with the option names as keys) of `ibot
/// train` / `ibot demo` into arguments placed right after the subcommand, before the remaining
/// command-line arguments, so that explicit options win. Only the arguments of those two
/// subcommands are looked at (a value such as `--output_dir train` is never taken for the
/// subcommand); `ibot launch ... train --preset X` is left alone: each worker expands its own
/// command line.
pub fn expand_config_args(args: Vec<String>) -> Result<Vec<String>> {
    let Some(mut sub) = subcommand_position(&args) else {
        return Ok(args);
    };
    let bench = args[sub] == "bench";
    // `bench train` (alias `bench step`) takes every train option, presets included.
    if bench
        && matches!(
            args.get(sub + 1).map(String::as_str),
            Some("train" | "step")
        )
    {
        sub += 1;
    } else if args[sub] != "train" && args[sub] != "demo" {
        return Ok(args);
    }
    let mut out: Vec<String> = args[..=sub].to_vec();
    let mut front: Vec<String> = Vec::new();
    let mut i = sub + 1;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            out.extend(args[i..].iter().cloned());
            break;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if flag == "--preset" || flag == "--config" {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .with_context(|| format!("{flag} needs a value"))?
                }
            };
            if flag == "--preset" {
                front.extend(preset_args(&value)?);
            } else {
                front.extend(config_file_args(
                    &PathBuf::from(&value),
                    &options_of(bench, &args[sub]),
                )?);
            }
        } else {
            out.push(a.clone());
        }
        i += 1;
    }
    let at = sub + 1;
    out.splice(at..at, front);
    Ok(out)
}

/// The options of `ibot train` / `ibot demo` / `ibot bench train`, to check a config file's keys
/// and their number of values against (clap would otherwise report a stray list item as an
/// "unexpected argument" and silently take `preset = ...` for nothing, without naming the file).
fn options_of(bench: bool, sub: &str) -> clap::Command {
    use clap::{Args, Command};
    let mut c = match (bench, sub) {
        (true, _) => super::bench::StepBench::augment_args(Command::new("bench train")),
        (false, "demo") => super::demo::DemoArgs::augment_args(Command::new("demo")),
        _ => super::train::TrainArgs::augment_args(Command::new("train")),
    };
    c.build();
    c
}

fn preset_args(name: &str) -> Result<Vec<String>> {
    let Some((_, _, list)) = PRESETS.iter().find(|(n, _, _)| *n == name) else {
        bail!(
            "unknown preset '{name}'; available: {}",
            PRESETS
                .iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(list.iter().map(|s| s.to_string()).collect())
}

fn config_file_args(path: &PathBuf, cmd: &clap::Command) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {} as TOML", path.display()))?;
    let file = path.display();
    // A `preset = "NAME"` key: the preset's options go before the file's others.
    let mut front = Vec::new();
    let mut out = Vec::new();
    for (k, v) in table {
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!("{file}: option '{k}' has an unsupported value {other}"),
            })
        };
        if k == "preset" {
            let toml::Value::String(name) = &v else {
                bail!("{file}: preset must be a preset name in quotes (got {v})");
            };
            front.extend(preset_args(name).with_context(|| format!("{file}: preset"))?);
            continue;
        }
        if k == "config" {
            bail!("{file}: a config file cannot include another (key 'config'); pass several --config options instead");
        }
        // --threads is an option of `ibot` itself, accepted after the subcommand too.
        let max_values = if k == "threads" {
            1
        } else {
            let Some(arg) = cmd.get_arguments().find(|a| {
                a.get_long() == Some(k.as_str())
                    || a.get_all_aliases()
                        .is_some_and(|al| al.contains(&k.as_str()))
            }) else {
                bail!(
                    "{file}: unknown option '{k}' (keys are the names of `ibot {}` options without the leading --)",
                    cmd.get_name()
                );
            };
            arg.get_num_args().map_or(1, |r| r.max_values())
        };
        out.push(format!("--{k}"));
        match &v {
            toml::Value::Array(items) => {
                if items.is_empty() {
                    bail!("{file}: option '{k}' is given an empty list");
                }
                if items.len() > max_values {
                    let takes = if max_values == 1 {
                        "one value".to_string()
                    } else {
                        format!("at most {max_values} values")
                    };
                    bail!(
                        "{file}: option '{k}' takes {takes}, not a list of {} ({k} = {v})",
                        items.len()
                    );
                }
                for it in items {
                    out.push(scalar(it)?);
                }
            }
            other => out.push(scalar(other)?),
        }
    }
    front.extend(out);
    Ok(front)
}

/// `ibot presets`: every recipe with its options.
pub fn print() -> Result<()> {
    for (name, what, args) in PRESETS {
        println!("{name}: {what}\n    {}\n", args.join(" "));
    }
    Ok(())
}
