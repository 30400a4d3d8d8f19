use std::time::Instant;
use ibot::loss::SingleProcess;
use tch::{Device, Kind, Tensor};
fn main() -> anyhow::Result<()> {
    let b = ibot::bench::StepBench { arch: "vit_small".into(), patch_size: 16, batch: 8, global_crops_size: 224, local_crops_size: 96, local_crops_number: 2, out_dim: 8192, drop_path: 0.1, iters: 1, warmup: 0 };
    let _ = b;
    let mut backbone = ibot::models::VitConfig::from_arch("vit_small", 16)?;
    backbone.drop_path_rate = 0.1; backbone.masked_im_modeling = true;
    let head = ibot::models::HeadConfig::new(384, 8192, 8192, true, false);
    let loss = ibot::loss::IbotLossConfig { out_dim: 8192, patch_out_dim: 8192, ngcrops: 2, nlcrops: 2, warmup_teacher_temp: 0.04, teacher_temp: 0.04, warmup_teacher_temp2: 0.04, teacher_temp2: 0.07, warmup_teacher_temp_epochs: 1, nepochs: 1, student_temp: 0.1, center_momentum: 0.9, center_momentum2: 0.9, lambda1: 1.0, lambda2: 1.0, mim_start_epoch: 0 };
    let cfg = ibot::train::IbotConfig { backbone, head, shared_head_teacher: true, loss, clip_grad: 3.0, freeze_last_layer: 0, optimizer: ibot::train::optim::OptimizerKind::Adamw };
    let mut ibot = ibot::train::Ibot::new(cfg, Device::Cpu)?;
    let opts = (Kind::Float, Device::Cpu);
    for it in 0..4 {
        let mut views: Vec<Tensor> = (0..2).map(|_| Tensor::randn([8, 3, 224, 224], opts)).collect();
        views.extend((0..2).map(|_| Tensor::randn([8, 3, 96, 96], opts)));
        let masks: Vec<Tensor> = (0..2).map(|_| Tensor::rand([8, 14, 14], opts).lt(0.3)).collect();
        let a0 = Instant::now();
        let tt = tch::no_grad(|| ibot.teacher.forward(&views[..2], None, false))?;
        let a1 = Instant::now();
        let ss = ibot.student.forward(&views[..2], Some(&masks[..2]), true)?;
        let a2 = Instant::now();
        let sl = ibot.student.forward(&views[2..], None, true)?;
        let a3 = Instant::now();
        let l = ibot.loss.forward(&ss.cls, ss.patch.as_ref().unwrap(), &tt.cls, tt.patch.as_ref().unwrap(), Some(&sl.cls), &masks, 0, &SingleProcess)?;
        let a4 = Instant::now();
        let l2 = ibot.loss.forward(&ss.cls, ss.patch.as_ref().unwrap(), &tt.cls, tt.patch.as_ref().unwrap(), Some(&sl.cls), &masks, 0, &SingleProcess)?;
        let a5 = Instant::now();
        let tp = tt.patch.as_ref().unwrap();
        println!("second loss {:.0}  strides {:?} sp {:?} {:?}", (a5-a4).as_secs_f64()*1e3, tp.stride(), ss.patch.as_ref().unwrap().stride(), ss.patch.as_ref().unwrap().size());
        drop(l2);
        println!("teacher {:.0} student {:.0} local {:.0} loss {:.0}", (a1-a0).as_secs_f64()*1e3, (a2-a1).as_secs_f64()*1e3, (a3-a2).as_secs_f64()*1e3, (a4-a3).as_secs_f64()*1e3);
        drop((tt, ss, sl, l));
        let t0 = Instant::now();
        let f = ibot.forward(&views, &masks, 0, true, &SingleProcess)?;
        let t1 = Instant::now();
        let mut g = ibot.backward(&f.loss.total);
        let t2 = Instant::now();
        ibot.process_grads(&mut g, 0);
        let t3 = Instant::now();
        ibot.optimizer.step(&ibot.student_ps, &g, 5e-4, 0.04)?;
        let t4 = Instant::now();
        ibot.update_teacher(0.996);
        let t5 = Instant::now();
        println!("it {it}: fwd {:.0} bwd {:.0} clip {:.0} opt {:.0} ema {:.0} ms", (t1-t0).as_secs_f64()*1e3, (t2-t1).as_secs_f64()*1e3, (t3-t2).as_secs_f64()*1e3, (t4-t3).as_secs_f64()*1e3, (t5-t4).as_secs_f64()*1e3);
    }
    Ok(())
}
