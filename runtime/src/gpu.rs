//! GPU utilisation and memory from NVML, for the advisor and for people on
//! call. NVML is loaded at run time (`libnvidia-ml.so.1`, shipped with the
//! NVIDIA driver): a pod without the driver simply exports no GPU metrics,
//! and the advisor uses the engine's busy ratio instead.

use crate::metrics::Metrics;
use nvml_wrapper::Nvml;
use std::collections::VecDeque;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often NVML is asked. Its utilisation is the share of the last sample
/// period (1/6 s to 1 s, per GPU model) in which a kernel ran.
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);
/// Samples averaged into the exported utilisation: 15 s smooths single
/// batches out without hiding a change of load for long.
const WINDOW: usize = 15;

/// Samples every GPU NVML sees until `shutdown`; returns at once (logging
/// why) when NVML cannot be loaded.
pub async fn sample(metrics: Metrics, shutdown: CancellationToken) {
    let nvml = match tokio::task::spawn_blocking(Nvml::init).await {
        Ok(Ok(nvml)) => nvml,
        Ok(Err(err)) => {
            tracing::info!(error = %err, "no NVML: GPU metrics are not exported");
            return;
        }
        Err(err) => {
            tracing::warn!(error = %err, "loading NVML did not finish");
            return;
        }
    };
    let nvml = std::sync::Arc::new(nvml);
    let mut windows: Vec<VecDeque<f64>> = Vec::new();
    loop {
        let reader = nvml.clone();
        let readings = tokio::task::spawn_blocking(move || read_all(&reader)).await;
        match readings {
            Ok(Ok(readings)) => {
                windows.resize_with(readings.len(), VecDeque::new);
                for (index, (reading, window)) in readings.iter().zip(&mut windows).enumerate() {
                    window.push_back(reading.utilization);
                    if window.len() > WINDOW {
                        window.pop_front();
                    }
                    let mean = window.iter().sum::<f64>() / window.len() as f64;
                    metrics.set_gpu(
                        index as u32,
                        mean,
                        reading.memory_used,
                        reading.memory_total,
                    );
                }
            }
            Ok(Err(err)) => tracing::debug!(error = %err, "reading NVML failed"),
            Err(err) => tracing::debug!(error = %err, "reading NVML did not finish"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_PERIOD) => {}
        }
    }
}

struct Reading {
    utilization: f64,
    memory_used: u64,
    memory_total: u64,
}

fn read_all(nvml: &Nvml) -> Result<Vec<Reading>, nvml_wrapper::error::NvmlError> {
    let count = nvml.device_count()?;
    (0..count)
        .map(|index| {
            let device = nvml.device_by_index(index)?;
            let utilization = device.utilization_rates()?;
            let memory = device.memory_info()?;
            Ok(Reading {
                utilization: f64::from(utilization.gpu) / 100.0,
                memory_used: memory.used,
                memory_total: memory.total,
            })
        })
        .collect()
}
