use super::*;

fn stats(window: LoadWindow) -> ExpertLoadStats {
    ExpertLoadStats::new(2, 4, window).unwrap()
}

#[test]
fn record_counts_each_routed_token_per_layer() {
    let mut s = stats(LoadWindow::Cumulative);
    // Three tokens, top-2, layer 0; one token layer 1.
    s.record(0, &[0, 1, 1, 2, 0, 1], 2).unwrap();
    s.record(1, &[3, 2], 2).unwrap();
    s.finish_step();
    let snap = s.snapshot();
    assert_eq!(snap.layer(0).unwrap(), &[2.0, 3.0, 1.0, 0.0]);
    assert_eq!(snap.layer(1).unwrap(), &[0.0, 0.0, 1.0, 1.0]);
    assert_eq!(snap.steps(), 1);
}

#[test]
fn step_in_progress_is_not_in_the_snapshot() {
    let mut s = stats(LoadWindow::Cumulative);
    s.record(0, &[1], 1).unwrap();
    assert_eq!(s.snapshot().total(), 0.0);
    s.finish_step();
    assert_eq!(s.snapshot().total(), 1.0);
}

#[test]
fn sliding_window_forgets_steps_older_than_the_window() {
    let mut s = stats(LoadWindow::Sliding { steps: 2 });
    for expert in [0_u32, 1, 2] {
        s.record(0, &[expert], 1).unwrap();
        s.finish_step();
    }
    // Steps routed to 0, 1, 2; a window of 2 keeps 1 and 2.
    assert_eq!(s.snapshot().layer(0).unwrap(), &[0.0, 1.0, 1.0, 0.0]);
    assert_eq!(s.steps(), 3);
}

#[test]
fn exponential_decay_halves_a_step_after_its_half_life() {
    let mut s = stats(LoadWindow::ExponentialDecay {
        half_life_steps: 2.0,
    });
    s.record(0, &[0], 1).unwrap();
    s.finish_step();
    s.finish_step();
    s.finish_step();
    // Two steps later the one token weighs 0.5.
    let w = s.snapshot().layer(0).unwrap()[0];
    assert!((w - 0.5).abs() < 1e-12, "{w}");
}

#[test]
fn record_counts_adds_a_counter_vector() {
    let mut s = stats(LoadWindow::Cumulative);
    s.record_counts(1, &[1, 2, 3, 4]).unwrap();
    s.record_counts(1, &[1, 0, 0, 0]).unwrap();
    s.finish_step();
    assert_eq!(s.snapshot().layer(1).unwrap(), &[2.0, 2.0, 3.0, 4.0]);
    assert!(s.record_counts(1, &[1, 2]).is_err());
}

#[test]
fn bad_inputs_are_errors_naming_what_is_wrong() {
    let mut s = stats(LoadWindow::Cumulative);
    assert!(matches!(
        s.record(2, &[0], 1),
        Err(EpError::LayerOutOfRange { layer: 2, .. })
    ));
    assert!(matches!(
        s.record(0, &[4], 1),
        Err(EpError::ExpertOutOfRange { expert: 4, .. })
    ));
    assert!(matches!(
        s.record(0, &[0, 1, 2], 2),
        Err(EpError::RoutingShape { .. })
    ));
    let err = ExpertLoadStats::new(1, 4, LoadWindow::Sliding { steps: 0 }).unwrap_err();
    assert!(err.to_string().contains("window.steps"), "{err}");
    let err = ExpertLoadStats::new(
        1,
        4,
        LoadWindow::ExponentialDecay {
            half_life_steps: f64::NAN,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("window.half_life_steps"), "{err}");
    assert!(ExpertLoadStats::new(0, 4, LoadWindow::Cumulative).is_err());
}

#[test]
fn load_file_round_trips_through_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    let load = ExpertLoad::new(vec![vec![1.5, 0.0, 2e9, 3.0], vec![0.25; 4]])
        .unwrap()
        .with_steps(42);
    load.write(&path).unwrap();
    let back = ExpertLoad::read(&path).unwrap();
    assert_eq!(back, load);
    assert_eq!(back.steps(), 42);
    // serde (as another config would embed it) agrees with the file format.
    let via_serde: ExpertLoad =
        serde_json::from_str(&serde_json::to_string(&load).unwrap()).unwrap();
    assert_eq!(via_serde, load);
}

#[test]
fn load_file_documented_in_the_module_parses() {
    let text = r#"{ "version": 1, "num_logical_experts": 4, "steps": 100,
      "load": [[120.0, 3.0, 40.5, 0.0], [10.0, 10.0, 10.0, 10.0]] }"#;
    let load = ExpertLoad::from_json_str(text).unwrap();
    assert_eq!(load.num_layers(), 2);
    assert_eq!(load.layer(0).unwrap()[2], 40.5);
}

#[test]
fn malformed_load_files_are_errors_naming_the_field() {
    let cases = [
        (
            r#"{"version": 2, "num_logical_experts": 1, "load": [[1]]}"#,
            "version",
        ),
        (
            r#"{"version": 1, "num_logical_experts": 2, "load": [[1]]}"#,
            "num_logical_experts",
        ),
        (
            r#"{"version": 1, "num_logical_experts": 2, "load": [[1, 2], [1]]}"#,
            "load[1]",
        ),
        (
            r#"{"version": 1, "num_logical_experts": 2, "load": [[1, -2]]}"#,
            "load[0][1]",
        ),
        (
            r#"{"version": 1, "num_logical_experts": 1, "load": [[1]], "extra": 0}"#,
            "extra",
        ),
        (
            r#"{"version": 1, "num_logical_experts": 0, "load": []}"#,
            "load",
        ),
    ];
    for (text, field) in cases {
        let err = ExpertLoad::from_json_str(text).unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

#[test]
fn missing_load_file_is_an_error_naming_the_path() {
    let err = ExpertLoad::read(Path::new("/nonexistent/pdserve-load.json")).unwrap_err();
    assert!(err.to_string().contains("pdserve-load.json"), "{err}");
}
