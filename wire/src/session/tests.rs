//! The sessions against each other: the simulated pair over thousands of random schedules, and
//! the edges one at a time.

use super::sim::{self, End, Program, Rng, Scenario, SIM_DRAIN_LIMIT};

/// How many randomized conversations one test run drives (`FERRY_SIM_RUNS` overrides).
fn runs() -> u64 {
    std::env::var("FERRY_SIM_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(10_000)
}

/// Checks one conversation's outcome against the model; `Err` names the difference.
fn check(scenario: &Scenario, seed: u64) -> Result<usize, String> {
    let run = sim::run(scenario, seed, 2_000_000)?;
    run.client_end
        .map_err(|err| format!("the client session failed: {err}"))?;
    let expected = scenario.expected();
    let outcome = &run.outcome;
    if let Program::Flood { flood } = scenario.program {
        // Where the cut falls depends on the schedule; that it falls, and how, does not.
        let got = outcome.stdout.len();
        if outcome.end != expected.end
            || !outcome.stdout.iter().all(|b| *b == b'f')
            || got <= SIM_DRAIN_LIMIT
            || got > SIM_DRAIN_LIMIT + ferry_max_data()
            || got > flood
        {
            return Err(format!("flood: {got} bytes, end {:?}", outcome.end));
        }
        return Ok(run.steps);
    }
    if outcome != &expected {
        return Err(format!(
            "outcome differs: started {} / {}, stdout {} / {} bytes (equal: {}), stderr {} / {} bytes (equal: {}), end {:?} / {:?}",
            outcome.started,
            expected.started,
            outcome.stdout.len(),
            expected.stdout.len(),
            outcome.stdout == expected.stdout,
            outcome.stderr.len(),
            expected.stderr.len(),
            outcome.stderr == expected.stderr,
            outcome.end,
            expected.end
        ));
    }
    Ok(run.steps)
}

fn ferry_max_data() -> usize {
    crate::limits::MAX_DATA
}

#[test]
fn simulated_pair_ends_every_conversation_as_the_model_says() {
    let runs = runs();
    let mut steps = 0;
    let mut seen = [0usize; 6];
    for seed in 0..runs {
        let scenario = Scenario::random(&mut Rng::new(seed ^ 0x5eed));
        seen[match scenario.program {
            Program::Print { .. } => 0,
            Program::Cat => 1,
            Program::Head { .. } => 2,
            Program::Killed { .. } => 3,
            Program::Missing => 4,
            Program::Flood { .. } => 5,
        }] += 1;
        match check(&scenario, seed) {
            Ok(n) => steps += n,
            Err(err) => panic!(
                "seed {seed}: {err}\nscenario: {:?} with {} stdin bytes",
                match &scenario.program {
                    Program::Print {
                        stdout,
                        stderr,
                        code,
                    } => format!("print {}+{} bytes, exit {code}", stdout.len(), stderr.len()),
                    other => format!("{other:?}"),
                },
                scenario.stdin.as_ref().map_or(0, Vec::len)
            ),
        }
    }
    assert!(seen.iter().all(|n| *n > 0), "every program ran: {seen:?}");
    eprintln!("{runs} conversations, {steps} scheduler steps, programs {seen:?}");
}

/// The same conversation under different schedules ends the same way.
#[test]
fn schedules_do_not_change_results() {
    let scenario = Scenario {
        program: Program::Cat,
        stdin: Some(Rng::new(7).bytes(300_000)),
    };
    for seed in 0..200 {
        check(&scenario, seed).unwrap_or_else(|err| panic!("seed {seed}: {err}"));
    }
    let refused = Scenario {
        program: Program::Missing,
        stdin: None,
    };
    assert_eq!(
        refused.expected().end,
        End::Refused(crate::ErrorCode::NotFound)
    );
    for seed in 0..200 {
        check(&refused, seed).unwrap_or_else(|err| panic!("seed {seed}: {err}"));
    }
}
