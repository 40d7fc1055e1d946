use candle_core::{Device, Tensor};
use ocr_engine::models::{DetModel, RecModel};
fn main() {
    let dir = std::path::PathBuf::from("/root/.cache/ocr-models");
    let det = DetModel::load(&dir.join("ppocrv6_small_det.onnx"), &Device::Cpu).unwrap();
    let rec = RecModel::load(&dir.join("ppocrv6_small_rec.onnx"), &Device::Cpu).unwrap();
    let x = Tensor::rand(-1f32, 1f32, (1, 3, 960, 960), &Device::Cpu).unwrap();
    let r = Tensor::rand(-1f32, 1f32, (8, 3, 48, 320), &Device::Cpu).unwrap();
    for (name, f) in [("det", Box::new(|| { det.forward(&x).unwrap(); }) as Box<dyn Fn()>), ("rec", Box::new(|| { rec.forward(&r).unwrap(); }))] {
        f();
        ocr_engine::models::layers::PROF.lock().unwrap().clear();
        let t = std::time::Instant::now();
        f();
        let total = t.elapsed().as_secs_f64() * 1e3;
        let p = ocr_engine::models::layers::PROF.lock().unwrap();
        let mut agg: std::collections::HashMap<String, (f64, usize)> = Default::default();
        let mut sum = 0.0;
        for (k, v) in p.iter() { let e = agg.entry(k.clone()).or_default(); e.0 += v; e.1 += 1; sum += v; }
        let mut v: Vec<_> = agg.into_iter().collect();
        v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        println!("== {name}: total {total:.1} ms, convs+acts {sum:.1} ms");
        for (k, (t, n)) in v.iter().take(25) { println!("{t:8.1} ms {n:3}x {k}"); }
    }
}
