use candle_core::{Device, Tensor};
fn main() {
    let d = Device::Cpu;
    for &(m, k, n) in &[(384usize, 768usize, 900usize), (768, 384, 900), (96, 48, 57600), (384, 192, 3600), (384,768,900)] {
        let a = Tensor::rand(-1f32, 1f32, (m, k), &d).unwrap();
        let b = Tensor::rand(-1f32, 1f32, (k, n), &d).unwrap();
        let _ = a.matmul(&b).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..5 { let _ = a.matmul(&b).unwrap(); }
        let ms = t.elapsed().as_secs_f64() * 1e3 / 5.0;
        println!("{m}x{k}x{n}: {ms:.2} ms, {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / ms / 1e6);
    }
}
