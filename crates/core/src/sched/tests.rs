//! The planner's edge cases, one branch each, and a seeded property test over random workloads.

use super::sim::{self, Rng};
use super::*;

fn cfg(max_batch_tokens: usize) -> PlannerConfig {
    PlannerConfig {
        max_batch_tokens,
        prefix_caching: false,
        admission_watermark_blocks: 0,
        ..Default::default()
    }
}

fn spec(len: usize, max_new: usize, base: u32) -> SeqSpec {
    SeqSpec {
        prompt: (0..len as u32).map(|t| base + t).collect(),
        max_new_tokens: max_new,
        speculative: false,
    }
}

/// Completes a step as the last stage and the emitter would: `token` for every sampled item, and
/// the sequence finishes at its `max_new_tokens`.
fn complete(p: &mut Planner, plan: &StepPlan, token: u32) {
    for it in p.step_done(plan.step_id).unwrap() {
        if it.sample {
            let generated = p.tokens(it.id).unwrap().len() - p.prompt_len(it.id).unwrap();
            let finished = generated + 1 >= p.max_new_tokens(it.id).unwrap();
            p.sampled(it.id, SampleOutcome { tokens: vec![token], finished, ..Default::default() });
        } else {
            p.prefilled(it.id, it.tokens);
        }
    }
}

fn item(plan: &StepPlan, id: SeqId) -> Option<&WorkItem> {
    plan.items.iter().find(|w| w.id == id)
}

fn leak_free(p: &Planner) {
    let a = p.allocator();
    assert_eq!(a.num_free(), a.num_blocks(), "blocks leaked: {:?}", p.stats());
}

#[test]
fn refuses_a_sequence_that_cannot_fit_alone() {
    let mut p = Planner::new(cfg(64), 4, 4);
    let err = p.add(spec(10, 8, 0)).unwrap_err();
    assert_eq!(err, AddError::TooLarge { needed: 17, prompt: 10, max_new_tokens: 8, capacity: 16 });
    assert!(err.to_string().contains("16 tokens"), "{err}");
    assert_eq!(p.add(SeqSpec { prompt: vec![], ..spec(1, 1, 0) }), Err(AddError::EmptyPrompt));
    // Exactly full is fine: the last sampled token is never cached.
    assert!(p.add(spec(10, 7, 0)).is_ok());
}

#[test]
fn chunked_prefill_then_decode_under_the_budget() {
    let mut p = Planner::new(cfg(4), 8, 4);
    let a = p.add(spec(6, 3, 0)).unwrap();
    let s1 = p.plan().unwrap();
    assert_eq!(s1.admitted, vec![a]);
    let w = item(&s1, a).unwrap();
    assert_eq!((w.cached, w.tokens.len(), w.sample, w.setup), (0, 4, false, true));
    assert!(p.plan().is_none(), "one step in flight at a time");
    complete(&mut p, &s1, 0);
    let s2 = p.plan().unwrap();
    let w = item(&s2, a).unwrap();
    assert_eq!((w.cached, w.tokens.len(), w.sample, w.setup), (4, 2, true, false));
    assert_eq!(w.new_blocks.len(), 1, "the second chunk's block");
    complete(&mut p, &s2, 50);
    let s3 = p.plan().unwrap();
    assert_eq!(item(&s3, a).unwrap().tokens, vec![50], "decode feeds the sampled token");
}

#[test]
fn decode_preempts_the_newest_and_it_is_recomputed() {
    // Pool of 4 blocks of 4. a: 4 prompt tokens (block 0); b: 7 (blocks 1, 2); one block free.
    let mut p = Planner::new(cfg(64), 4, 4);
    let a = p.add(spec(4, 6, 0)).unwrap();
    let b = p.add(spec(7, 4, 100)).unwrap();
    let s1 = p.plan().unwrap();
    assert_eq!(s1.admitted, vec![a, b]);
    complete(&mut p, &s1, 1);
    // a's slot 4 takes the free block; b's slot 7 fits its own.
    let s2 = p.plan().unwrap();
    assert!(item(&s2, a).is_some() && item(&s2, b).is_some());
    assert_eq!(p.allocator().num_free(), 0);
    complete(&mut p, &s2, 1);
    // b's slot 8 needs a block and b is the newest: it waits, nobody is preempted.
    for _ in 0..3 {
        let s = p.plan().unwrap();
        assert!(item(&s, a).is_some() && item(&s, b).is_none() && s.preempted.is_empty(), "{s:?}");
        complete(&mut p, &s, 1);
    }
    // a's slot 8 needs a block: b, newer, is preempted; a gets its block.
    let s = p.plan().unwrap();
    assert_eq!(s.preempted, vec![b]);
    assert!(item(&s, a).is_some() && item(&s, b).is_none() && p.is_waiting(b));
    assert_eq!(s.release, vec![b], "the stages forget it before this step runs");
    complete(&mut p, &s, 1); // a finishes (6 tokens)
                             // b is recomputed from all its tokens, set up anew.
    let s = p.plan().unwrap();
    assert_eq!(s.release, vec![a]);
    let w = item(&s, b).unwrap();
    assert_eq!((w.cached, w.tokens.len(), w.setup, w.sample), (0, 9, true, true));
    assert!(s.admitted.is_empty(), "not a first admission");
    complete(&mut p, &s, 1);
    while !p.ids().is_empty() {
        let s = p.plan().unwrap();
        complete(&mut p, &s, 1);
    }
    assert_eq!(p.stats().preemptions, 1);
    leak_free(&p);
}

#[test]
fn partial_prefill_preempts_a_newer_partial_without_panicking() {
    // The crash of issue 14: an earlier partial's growth preempts a later partial of the same step.
    let mut p = Planner::new(cfg(8), 6, 4);
    p.add(spec(16, 2, 0)).unwrap();
    let b = p.add(spec(12, 2, 100)).unwrap();
    // Step 1: a takes 8 tokens (2 blocks); no room left in the budget for b.
    let s1 = p.plan().unwrap();
    assert_eq!(s1.items.len(), 1);
    complete(&mut p, &s1, 0);
    // Step 2: a's next chunk (8) takes 2 more blocks; budget is spent.
    let s2 = p.plan().unwrap();
    complete(&mut p, &s2, 0);
    assert!(p.is_waiting(b) || item(&s2, b).is_some());
    // Drive on: whatever the interleaving, b never blocks a and nothing panics.
    let mut steps = 0;
    while !p.ids().is_empty() {
        let s = p.plan().expect("progress");
        for &v in &s.preempted {
            assert!(v > s.items.iter().map(|w| w.id).min().unwrap_or(0), "victims arrived later");
        }
        complete(&mut p, &s, 7);
        steps += 1;
        assert!(steps < 100);
    }
    leak_free(&p);
}

#[test]
fn a_newer_partial_planned_in_the_same_step_is_taken_back_when_preempted() {
    let mut p = Planner::new(cfg(16), 4, 4);
    let a = p.add(spec(5, 8, 0)).unwrap(); // will decode
    let b = p.add(spec(10, 1, 100)).unwrap(); // prefills in chunks
    let s1 = p.plan().unwrap();
    // a: 5 tokens (2 blocks), b: 10 tokens would need 3 blocks but only 2 remain: 8 tokens.
    assert_eq!(item(&s1, a).unwrap().tokens.len(), 5);
    assert_eq!(item(&s1, b).unwrap().tokens.len(), 8);
    complete(&mut p, &s1, 9);
    // a decodes at slot 5 (its block 2 has room); b needs a block for its last 2 tokens and cannot
    // preempt a (older): b waits, a proceeds.
    let s2 = p.plan().unwrap();
    assert!(item(&s2, a).is_some());
    assert!(item(&s2, b).is_none() && s2.preempted.is_empty(), "{s2:?}");
    complete(&mut p, &s2, 9);
    // a keeps decoding until it needs a third block: then b (newer) is the victim.
    let mut preempted = false;
    for _ in 0..4 {
        let s = p.plan().unwrap();
        if s.preempted == vec![b] {
            preempted = true;
            assert!(item(&s, b).is_none(), "a preempted sequence is not in the step");
        }
        complete(&mut p, &s, 9);
    }
    assert!(preempted);
}

#[test]
fn admission_never_preempts_and_keeps_arrival_order() {
    let mut p = Planner::new(cfg(64), 4, 4);
    let a = p.add(spec(12, 4, 0)).unwrap(); // 3 blocks
    let b = p.add(spec(8, 1, 100)).unwrap(); // needs 2: does not fit beside a
    let c = p.add(spec(2, 1, 200)).unwrap(); // would fit, but may not overtake b
    let s1 = p.plan().unwrap();
    assert_eq!(item(&s1, a).unwrap().tokens.len(), 12);
    // b gets the one block left (4 of its 8 tokens): admission chunks to what fits.
    assert_eq!(item(&s1, b).map(|w| w.tokens.len()), Some(4));
    assert!(item(&s1, c).is_none() && p.is_waiting(c), "c waits behind b");
    assert!(s1.preempted.is_empty());
    complete(&mut p, &s1, 5);
    while !p.ids().is_empty() {
        let s = p.plan().unwrap();
        for &v in &s.preempted {
            assert!(s.items.iter().all(|w| w.id < v), "only later arrivals are preempted");
        }
        complete(&mut p, &s, 5);
    }
    leak_free(&p);
}

#[test]
fn a_victim_in_flight_is_waited_for_not_skipped() {
    // Two steps in flight at once; pool of 3 blocks of 4.
    let mut p = Planner::new(PlannerConfig { max_in_flight: 2, ..cfg(64) }, 3, 4);
    let a = p.add(spec(4, 8, 0)).unwrap();
    let b = p.add(spec(3, 8, 100)).unwrap();
    let s1 = p.plan().unwrap();
    assert!(p.plan().is_none(), "both are in flight");
    complete(&mut p, &s1, 1);
    // Decodes are spread over the two free slots: a (taking the last block), then b.
    let s2 = p.plan().unwrap();
    let s3 = p.plan().unwrap();
    assert_eq!((item(&s2, a).is_some(), item(&s3, b).is_some()), (true, true));
    assert_eq!(p.allocator().num_free(), 0);
    // a decodes slots 5, 6, 7 while b stays in flight.
    complete(&mut p, &s2, 1);
    for _ in 0..3 {
        let s = p.plan().unwrap();
        assert!(item(&s, a).is_some());
        complete(&mut p, &s, 1);
    }
    // a's slot 8 needs a block; b, the newest, is in flight: a waits, nobody is preempted.
    assert!(p.plan().is_none());
    assert!(p.is_in_flight(b) && p.stats().preemptions == 0);
    // b's result comes back: now it gives way.
    complete(&mut p, &s3, 1);
    let s = p.plan().unwrap();
    assert_eq!(s.preempted, vec![b]);
    assert!(item(&s, a).is_some());
}

#[test]
fn preempted_sequence_leaves_shared_prefix_blocks_to_their_other_holder() {
    let c = PlannerConfig { prefix_caching: true, ..cfg(64) };
    let mut p = Planner::new(c, 5, 4);
    let shared: Vec<u32> = (0..8).collect();
    let a = p
        .add(SeqSpec { prompt: [shared.clone(), vec![50]].concat(), max_new_tokens: 12, speculative: false })
        .unwrap();
    let s1 = p.plan().unwrap();
    complete(&mut p, &s1, 1);
    let b = p
        .add(SeqSpec { prompt: [shared.clone(), vec![60]].concat(), max_new_tokens: 8, speculative: false })
        .unwrap();
    let s2 = p.plan().unwrap();
    let wb = item(&s2, b).unwrap();
    assert_eq!(wb.cached, 8, "b starts after the two shared blocks");
    let ta = p.block_table(a).unwrap().to_vec();
    let tb = p.block_table(b).unwrap().to_vec();
    assert_eq!(ta[..2], tb[..2]);
    assert_eq!(p.allocator().ref_count(ta[0]), 2);
    complete(&mut p, &s2, 1);
    // Decode until a needs room and b is preempted.
    let mut seen = false;
    for _ in 0..30 {
        let Some(s) = p.plan() else { break };
        if s.preempted.contains(&b) {
            seen = true;
            assert_eq!(p.allocator().ref_count(ta[0]), 1, "a still holds the shared blocks");
            assert_eq!(p.allocator().ref_count(ta[1]), 1);
        }
        complete(&mut p, &s, 1);
    }
    assert!(seen, "{:?}", p.stats());
    while !p.ids().is_empty() {
        let s = p.plan().unwrap();
        complete(&mut p, &s, 1);
    }
    leak_free(&p);
}

#[test]
fn speculation_with_too_little_room_decodes_one_token_and_preempts_nobody() {
    let c = PlannerConfig { speculation: true, ..cfg(64) };
    // Pool of 3 blocks of 4: a (speculative) holds block 0, b blocks 1 and 2.
    let mut p = Planner::new(c.clone(), 3, 4);
    let a = p.add(SeqSpec { speculative: true, ..spec(3, 6, 0) }).unwrap();
    let b = p.add(spec(7, 3, 100)).unwrap();
    let s1 = p.plan().unwrap();
    for it in p.step_done(s1.step_id).unwrap() {
        p.sampled(it.id, SampleOutcome { tokens: vec![11], next_draft: Some(12), ..Default::default() });
    }
    // a has a draft, but slots 3 and 4 are needed to verify it and only slot 3 is reachable.
    let s2 = p.plan().unwrap();
    let w = item(&s2, a).unwrap();
    assert!(!w.verify && w.tokens == vec![11], "{w:?}");
    assert!(item(&s2, b).is_some() && s2.preempted.is_empty());
    // With room, the same draft is verified.
    let mut p = Planner::new(c, 8, 4);
    let a = p.add(SeqSpec { speculative: true, ..spec(3, 6, 0) }).unwrap();
    let s1 = p.plan().unwrap();
    p.step_done(s1.step_id);
    p.sampled(a, SampleOutcome { tokens: vec![11], next_draft: Some(12), ..Default::default() });
    let w = p.plan().unwrap().items[0].clone();
    assert!(w.verify && w.tokens == vec![11, 12] && w.sample);
}

#[test]
fn a_removed_sequence_in_flight_is_ignored_and_its_blocks_return() {
    let mut p = Planner::new(cfg(64), 4, 4);
    let a = p.add(spec(6, 4, 0)).unwrap();
    let s1 = p.plan().unwrap();
    assert!(p.is_in_flight(a));
    assert!(p.remove(a));
    leak_free(&p);
    let items = p.step_done(s1.step_id).unwrap();
    assert_eq!(items.len(), 1);
    p.prefilled(a, 6); // a no-op for an unknown sequence
    let s2 = p.plan().expect("a release-only step");
    assert_eq!((s2.release.clone(), s2.items.len()), (vec![a], 0));
    assert!(p.step_done(s2.step_id).unwrap().is_empty());
    assert!(p.plan().is_none(), "nothing left to say");
    assert!(p.step_done(999).is_none());
}

#[test]
fn drafts_rarely_accepted_end_speculation_and_the_stages_are_told() {
    let c = PlannerConfig {
        speculation: true,
        speculation_probation: 2,
        speculative_min_acceptance: 0.5,
        ..cfg(64)
    };
    let mut p = Planner::new(c, 8, 4);
    let a = p.add(SeqSpec { speculative: true, ..spec(2, 20, 0) }).unwrap();
    let s = p.plan().unwrap();
    p.step_done(s.step_id);
    p.sampled(a, SampleOutcome { tokens: vec![1], next_draft: Some(9), ..Default::default() });
    for _ in 0..2 {
        let s = p.plan().unwrap();
        assert!(item(&s, a).unwrap().verify);
        p.step_done(s.step_id);
        p.sampled(
            a,
            SampleOutcome {
                tokens: vec![1],
                draft_accepted: Some(false),
                next_draft: Some(9),
                finished: false,
            },
        );
    }
    assert!(!p.speculative(a));
    let s = p.plan().unwrap();
    let w = item(&s, a).unwrap();
    assert!(!w.verify && w.end_speculation);
    assert_eq!((p.stats().drafts_proposed, p.stats().drafts_accepted), (2, 0));
}

#[test]
fn reset_forgets_everything_but_keeps_ids_increasing() {
    let mut p = Planner::new(cfg(64), 4, 4);
    let a = p.add(spec(3, 2, 0)).unwrap();
    let _ = p.plan();
    assert_eq!(p.reset(8, 4), vec![a]);
    assert!(p.ids().is_empty());
    leak_free(&p);
    assert_eq!(p.allocator().num_blocks(), 8);
    assert!(p.add(spec(3, 2, 0)).unwrap() > a);
}

/// Random arrivals, prompt and output lengths, pool sizes, budgets, pipeline depths, prefix sharing,
/// speculation and cancellations: every accepted sequence completes with exactly the output it has
/// alone, nothing leaks, nothing panics, and nothing stalls.
#[test]
fn property_every_sequence_completes_as_if_alone() {
    let cases: u64 =
        std::env::var("MLASERVE_PLANNER_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let mut preemptions = 0;
    for case in 0..cases {
        let mut rng = Rng::new(case);
        let bs = [1, 2, 4, 16][rng.range(0, 3)];
        let n = rng.range(1, 10);
        let bases: Vec<Vec<u32>> =
            (0..3).map(|_| (0..rng.range(1, 40)).map(|_| rng.range(8, 900) as u32).collect()).collect();
        let mut specs = vec![];
        let mut at = 0;
        for _ in 0..n {
            let mut prompt = if rng.chance(0.5) { bases[rng.range(0, 2)].clone() } else { vec![] };
            prompt.extend((0..rng.range(1, 30)).map(|_| rng.range(8, 900) as u32));
            at += rng.range(0, 4);
            specs.push((
                SeqSpec { prompt, max_new_tokens: rng.range(1, 30), speculative: rng.chance(0.5) },
                at,
            ));
        }
        let largest = specs.iter().map(|(s, _)| s.prompt.len() + s.max_new_tokens).max().unwrap();
        // From "the largest barely fits alone" (or, sometimes, not even that) to ample.
        let min_blocks = (largest - 1).div_ceil(bs);
        let blocks = if rng.chance(0.05) {
            min_blocks.saturating_sub(1).max(1)
        } else {
            min_blocks + rng.range(0, min_blocks * 2)
        };
        let c = PlannerConfig {
            max_batch_tokens: rng.range(1, 64),
            max_running: rng.range(1, 8),
            max_in_flight: rng.range(1, 3),
            admission_watermark_blocks: rng.range(0, 2),
            prefix_caching: rng.chance(0.5),
            speculation: rng.chance(0.5),
            speculative_min_acceptance: 0.3,
            speculation_probation: 4,
        };
        let depth = c.max_in_flight;
        let cancel = if rng.chance(0.2) { 0.05 } else { 0.0 };
        let mut p = Planner::new(c.clone(), blocks, bs);
        let run = sim::drive(&mut p, &specs, case, depth, cancel);
        preemptions += p.stats().preemptions;
        for (i, (s, _)) in specs.iter().enumerate() {
            let fits = s.prompt.len() + s.max_new_tokens - 1 <= blocks * bs;
            if !fits {
                assert!(run.refused.contains(&i), "case {case}: seq {i} does not fit but was accepted");
                continue;
            }
            assert!(!run.refused.contains(&i), "case {case}: seq {i} fits but was refused");
            if run.cancelled.contains(&i) {
                continue;
            }
            let got = run.outputs.get(&i).unwrap_or_else(|| panic!("case {case}: seq {i} never finished"));
            assert_eq!(
                got,
                &sim::alone(s),
                "case {case} ({c:?}, {blocks} blocks of {bs}): seq {i} differs from alone"
            );
        }
        assert!(p.ids().is_empty());
        leak_free(&p);
    }
    assert!(preemptions > cases / 4, "the cases should exercise preemption (got {preemptions})");
}
