//! The README's grpcurl examples, run as written against both servers (in-process, on
//! ephemeral ports substituted for 50051/50052), through the reflection path.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

use spotifai_e2e::{grpcurl, start_insight, start_monitor};

/// The `grpcurl ...` lines of the README's grpcurl section.
fn readme_commands() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## Poking it with grpcurl")
        .nth(1)
        .expect("README has a grpcurl section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("grpcurl "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_grpcurl_examples_work_as_written() {
    let Some(grpcurl) = grpcurl() else { return };
    let insight = start_insight(insight_service::Config::default()).await;
    let monitor = start_monitor(&[]).await;
    let commands = readme_commands();
    assert!(commands.len() >= 11, "{commands:?}");

    let mut outputs = Vec::new();
    for command in &commands {
        let line = command
            .replace("localhost:50051", &insight.addr.to_string())
            .replace("localhost:50052", &monitor.addr.to_string())
            .replacen("grpcurl", &grpcurl.display().to_string(), 1);
        let output = tokio::task::spawn_blocking(move || {
            Command::new("bash").args(["-c", &line]).output().unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{command}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push((command.clone(), stdout));
    }

    for (command, out) in &outputs {
        if command.ends_with("localhost:50051 list") {
            for service in [
                "spotifai.insight.v1.InsightService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "grpc.reflection.v1.ServerReflection",
            ] {
                assert!(
                    out.lines().any(|l| l == service),
                    "{service} missing from:\n{out}"
                );
            }
            assert!(
                !out.contains("MemoryMonitor"),
                "insight lists only its own API"
            );
        } else if command.ends_with("localhost:50052 list") {
            for service in [
                "spotifai.monitor.v1.MemoryMonitor",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            ] {
                assert!(
                    out.lines().any(|l| l == service),
                    "{service} missing from:\n{out}"
                );
            }
        } else if command.contains(" describe ") {
            assert!(out.contains("rpc SummarizeFeedback"), "{out}");
            assert!(out.contains("rpc StreamFeedbackSummary"), "{out}");
        } else if command.contains("/ImportFeedback") {
            let response: serde_json::Value = serde_json::from_str(out).unwrap();
            assert_eq!(response["inserted"], 2, "{out}");
        } else if command.contains("/SummarizeFeedback") && command.contains("selector") {
            let summary: serde_json::Value = serde_json::from_str(out).unwrap();
            assert_eq!(summary["entriesUsed"], 2, "{out}");
            assert_eq!(summary["backend"], "local");
        } else if command.contains("/SubmitSummaryJob") {
            let job: serde_json::Value = serde_json::from_str(out).unwrap();
            assert!(!job["id"].as_str().unwrap().is_empty(), "{out}");
            assert_eq!(job["state"], "JOB_STATE_QUEUED", "{out}");
        } else if command.contains("/SummarizeFeedback") {
            let summary: serde_json::Value = serde_json::from_str(out).unwrap();
            assert_eq!(summary["chunks"].as_array().unwrap().len(), 2, "{out}");
            assert_eq!(summary["entriesUsed"], 3);
            assert_eq!(summary["backend"], "local");
            assert!(!summary["summary"].as_str().unwrap().is_empty());
        } else if command.contains("Health/Check") {
            assert!(out.contains("\"SERVING\""), "{out}");
        } else if command.contains("/GetSnapshot") {
            let sample: serde_json::Value = serde_json::from_str(out).unwrap();
            assert!(
                sample["process"]["rssBytes"]
                    .as_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    > 0
            );
        } else if command.contains("/StreamSamples") {
            let samples = out.matches("\"seq\"").count();
            assert!((4..=6).contains(&samples), "{samples} samples in:\n{out}");
        } else {
            panic!("no assertion for README command {command}");
        }
    }
    insight.shutdown().await.unwrap();
    monitor.shutdown().await.unwrap();
}
