//! Conformance checks of [`WebhookStore`]: outbox reads across merchants, the dispatcher's
//! cursor (an event is scheduled once, also under concurrent dispatchers), attempt records with
//! their version guard, re-sends and the delivery log.

use super::*;

const WEBHOOK: &str = "webhook";

/// Commits `n` payments of `m` to succeeded (one event each); returns their events, in order.
async fn events_for(store: &DynStore, m: MerchantId, prefix: &str, n: i64) -> Vec<EventRecord> {
    let mut ids = Vec::new();
    for i in 0..n {
        let new = new_payment_at(m, &format!("{prefix}-{i}"), T0 + i);
        create(store, &new).await;
        let t = succeed(&new.payment, &new.attempt, T0 + 100 + i);
        ids.push(t.event.as_ref().unwrap().id.clone());
        assert!(store.apply_transition(&t).await.unwrap());
    }
    let events = store.list_events(m, 0, 1000).await.unwrap();
    let events: Vec<EventRecord> = events.into_iter().filter(|e| ids.contains(&e.id)).collect();
    assert_eq!(events.len(), ids.len());
    events
}

fn delivery_of(e: &EventRecord, app_id: AppId, now_ms: i64) -> NewDelivery {
    NewDelivery {
        event_id: e.id.clone(),
        event_seq: e.seq,
        merchant_id: e.merchant_id,
        app_id,
        url: "https://shop.example/notify".into(),
        created_at_ms: now_ms,
    }
}

fn dispatch(from_seq: i64, to_seq: i64, deliveries: Vec<NewDelivery>) -> Dispatch {
    Dispatch {
        cursor: WEBHOOK_CURSOR.into(),
        from_seq,
        to_seq,
        deliveries,
        now_ms: T0,
    }
}

pub(crate) async fn check_outbox_reads_across_merchants(store: DynStore) {
    assert_eq!(store.outbox_head().await.unwrap(), 0);
    assert!(store.list_outbox(0, 10).await.unwrap().is_empty());
    let (a, b) = (merchant_at(T0).id, merchant_at(T0).id);
    let ea = events_for(&store, a, "oa", 3).await;
    let eb = events_for(&store, b, "ob", 2).await;
    let all = store.list_outbox(0, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "seq order");
    assert_eq!(store.outbox_head().await.unwrap(), all[4].seq);
    assert_eq!(
        store.list_outbox(all[1].seq, 2).await.unwrap(),
        all[2..4].to_vec()
    );

    // One event by id, scoped to its merchant unless asked for any.
    assert_eq!(
        store.get_event(Some(a), &ea[0].id).await.unwrap().as_ref(),
        Some(&ea[0])
    );
    assert_eq!(store.get_event(Some(b), &ea[0].id).await.unwrap(), None);
    assert_eq!(
        store.get_event(None, &eb[1].id).await.unwrap().as_ref(),
        Some(&eb[1])
    );
    assert_eq!(store.get_event(None, "evt_nope").await.unwrap(), None);

    // Newest first, paged by seq, one merchant only.
    let desc = store.list_events_desc(a, None, 10).await.unwrap();
    let mut expected = ea.clone();
    expected.reverse();
    assert_eq!(desc, expected);
    assert_eq!(
        store.list_events_desc(a, Some(ea[2].seq), 1).await.unwrap(),
        vec![ea[1].clone()]
    );
    assert!(store
        .list_events_desc(a, Some(ea[0].seq), 10)
        .await
        .unwrap()
        .is_empty());

    // Apps by id (a delivery is signed with its app's secret).
    let app = app_for(a, "key_hook");
    store.insert_app(&app).await.unwrap();
    assert_eq!(store.get_app(app.id).await.unwrap(), Some(app));
    assert_eq!(
        store
            .get_app(AppId::generate(T0 as u64, rand10()))
            .await
            .unwrap(),
        None
    );
}

pub(crate) async fn check_dispatch_schedules_each_event_once(store: DynStore) {
    let m = merchant_at(T0).id;
    let app = AppId::generate(T0 as u64, rand10());
    let events = events_for(&store, m, "d", 4).await;
    assert_eq!(store.outbox_cursor(WEBHOOK_CURSOR).await.unwrap(), 0);

    // The first two events looked at; only the first has a target.
    let first = dispatch(0, events[1].seq, vec![delivery_of(&events[0], app, T0)]);
    assert!(store.dispatch_deliveries(&first).await.unwrap());
    assert_eq!(
        store.outbox_cursor(WEBHOOK_CURSOR).await.unwrap(),
        events[1].seq
    );
    let d = store.get_delivery(&events[0].id).await.unwrap().unwrap();
    assert_eq!(
        (
            d.status,
            d.attempts,
            d.auto_attempts,
            d.next_attempt_at_ms,
            d.manual_due_at_ms,
            d.version
        ),
        (DeliveryStatus::Pending, 0, 0, Some(T0), None, 1)
    );
    assert_eq!(
        (d.merchant_id, d.app_id, d.event_seq),
        (m, app, events[0].seq)
    );
    assert_eq!(store.get_delivery(&events[1].id).await.unwrap(), None);
    assert_eq!(store.count_jobs(WEBHOOK).await.unwrap(), 1);
    assert_eq!(store.count_pending_deliveries().await.unwrap(), 1);

    // A dispatcher that read the old cursor loses and writes nothing.
    let stale = dispatch(0, events[3].seq, vec![delivery_of(&events[2], app, T0)]);
    assert!(!store.dispatch_deliveries(&stale).await.unwrap());
    assert_eq!(store.get_delivery(&events[2].id).await.unwrap(), None);
    assert_eq!(
        store.outbox_cursor(WEBHOOK_CURSOR).await.unwrap(),
        events[1].seq
    );

    // Concurrent dispatchers of the same range: exactly one wins.
    let mut tasks = JoinSet::new();
    for _ in 0..6 {
        let (store, d) = (
            store.clone(),
            dispatch(
                events[1].seq,
                events[3].seq,
                vec![
                    delivery_of(&events[2], app, T0),
                    delivery_of(&events[3], app, T0),
                ],
            ),
        );
        tasks.spawn(async move { store.dispatch_deliveries(&d).await.unwrap() });
    }
    let wins = tasks.join_all().await.into_iter().filter(|w| *w).count();
    assert_eq!(wins, 1);
    assert_eq!(store.count_jobs(WEBHOOK).await.unwrap(), 3);
    assert_eq!(
        store.lease_jobs(WEBHOOK, T0, 1000, 10).await.unwrap().len(),
        3,
        "every delivery's job is due at once"
    );

    // A cursor of another name starts at 0 and is created by its first dispatch.
    let other = Dispatch {
        cursor: "publisher".into(),
        ..dispatch(0, events[0].seq, vec![])
    };
    assert!(store.dispatch_deliveries(&other).await.unwrap());
    assert_eq!(
        store.outbox_cursor("publisher").await.unwrap(),
        events[0].seq
    );
    assert!(!store.dispatch_deliveries(&other).await.unwrap());
}

fn failed_log(e: &EventRecord, trigger: AttemptTrigger, t: i64) -> AttemptLog {
    AttemptLog {
        event_id: e.id.clone(),
        attempt: 0,
        merchant_id: e.merchant_id,
        trigger,
        url: "https://shop.example/notify".into(),
        status_code: Some(500),
        error: Some("http_status".into()),
        message: Some("HTTP 500".into()),
        latency_ms: 12,
        response_body: Some("oops".into()),
        created_at_ms: t,
    }
}

pub(crate) async fn check_attempts_resends_and_log(store: DynStore) {
    let m = merchant_at(T0).id;
    let app = AppId::generate(T0 as u64, rand10());
    let events = events_for(&store, m, "a", 2).await;
    let deliveries = events.iter().map(|e| delivery_of(e, app, T0)).collect();
    assert!(store
        .dispatch_deliveries(&dispatch(0, events[1].seq, deliveries))
        .await
        .unwrap());
    let e = &events[0];
    assert_eq!(
        store
            .lease_jobs(WEBHOOK, T0, 30_000, 10)
            .await
            .unwrap()
            .len(),
        2
    );

    // Attempt 1 failed: retry in 15 s.
    let retry = RecordAttempt {
        expected_version: 1,
        log: failed_log(e, AttemptTrigger::Schedule, T0 + 10),
        state: DeliveryState {
            status: DeliveryStatus::Pending,
            auto_attempts: 1,
            next_attempt_at_ms: Some(T0 + 15_010),
            manual_due_at_ms: None,
        },
        job_run_at_ms: Some(T0 + 15_010),
        alert: None,
        now_ms: T0 + 10,
    };
    assert_eq!(
        store.record_attempt(&retry).await.unwrap(),
        RecordedAttempt {
            attempt: 1,
            applied: true
        }
    );
    let d = store.get_delivery(&e.id).await.unwrap().unwrap();
    assert_eq!(
        (
            d.attempts,
            d.auto_attempts,
            d.next_attempt_at_ms,
            d.version,
            d.updated_at_ms
        ),
        (1, 1, Some(T0 + 15_010), 2, T0 + 10)
    );
    assert!(subjects(
        &store
            .lease_jobs(WEBHOOK, T0 + 15_009, 1000, 10)
            .await
            .unwrap()
    )
    .is_empty());
    assert_eq!(
        subjects(
            &store
                .lease_jobs(WEBHOOK, T0 + 15_010, 30_000, 10)
                .await
                .unwrap()
        ),
        BTreeSet::from([e.id.clone()])
    );

    // An attempt that started before a change is logged, but does not change the state.
    let stale = RecordAttempt {
        expected_version: 1,
        state: DeliveryState {
            status: DeliveryStatus::Delivered,
            auto_attempts: 9,
            next_attempt_at_ms: None,
            manual_due_at_ms: None,
        },
        job_run_at_ms: None,
        ..retry.clone()
    };
    assert_eq!(
        store.record_attempt(&stale).await.unwrap(),
        RecordedAttempt {
            attempt: 2,
            applied: false
        }
    );
    let d2 = store.get_delivery(&e.id).await.unwrap().unwrap();
    assert_eq!(
        (d2.status, d2.auto_attempts, d2.version, d2.attempts),
        (d.status, 1, 2, 2)
    );
    assert_eq!(store.count_jobs(WEBHOOK).await.unwrap(), 2, "job kept");

    // A re-send: due now, once, bounded.
    let r = store.request_resend(&e.id, T0 + 20, 2).await.unwrap();
    let ResendOutcome::Scheduled(r) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (r.manual_due_at_ms, r.manual_attempts, r.version),
        (Some(T0 + 20), 1, 3)
    );
    assert_eq!(
        subjects(
            &store
                .lease_jobs(WEBHOOK, T0 + 20, 30_000, 10)
                .await
                .unwrap()
        ),
        BTreeSet::from([e.id.clone()]),
        "the job is due at the re-send"
    );
    let again = store.request_resend(&e.id, T0 + 21, 2).await.unwrap();
    let ResendOutcome::Scheduled(again) = again else {
        panic!("{again:?}")
    };
    assert_eq!((again.manual_attempts, again.version), (1, 3), "asked once");

    // The manual attempt succeeds: delivered, job gone.
    let delivered = RecordAttempt {
        expected_version: 3,
        log: AttemptLog {
            status_code: Some(204),
            error: None,
            message: None,
            response_body: None,
            ..failed_log(e, AttemptTrigger::Manual, T0 + 30)
        },
        state: DeliveryState {
            status: DeliveryStatus::Delivered,
            auto_attempts: 1,
            next_attempt_at_ms: None,
            manual_due_at_ms: None,
        },
        job_run_at_ms: None,
        alert: None,
        now_ms: T0 + 30,
    };
    assert_eq!(
        store.record_attempt(&delivered).await.unwrap(),
        RecordedAttempt {
            attempt: 3,
            applied: true
        }
    );
    let d3 = store.get_delivery(&e.id).await.unwrap().unwrap();
    assert_eq!(
        (d3.status, d3.manual_due_at_ms, d3.next_attempt_at_ms),
        (DeliveryStatus::Delivered, None, None)
    );
    assert_eq!(store.count_jobs(WEBHOOK).await.unwrap(), 1);
    assert_eq!(store.count_pending_deliveries().await.unwrap(), 1);

    // A second re-send (of a delivered event) brings the job back; a third is over the limit.
    assert!(matches!(
        store.request_resend(&e.id, T0 + 40, 2).await.unwrap(),
        ResendOutcome::Scheduled(_)
    ));
    assert_eq!(store.count_jobs(WEBHOOK).await.unwrap(), 2);
    let d4 = store.get_delivery(&e.id).await.unwrap().unwrap();
    let consumed = RecordAttempt {
        expected_version: d4.version,
        state: DeliveryState {
            status: DeliveryStatus::Delivered,
            auto_attempts: 1,
            next_attempt_at_ms: None,
            manual_due_at_ms: None,
        },
        job_run_at_ms: None,
        ..delivered.clone()
    };
    assert!(store.record_attempt(&consumed).await.unwrap().applied);
    assert_eq!(
        store.request_resend(&e.id, T0 + 50, 2).await.unwrap(),
        ResendOutcome::LimitReached
    );
    assert_eq!(
        store.request_resend("evt_missing", T0, 2).await.unwrap(),
        ResendOutcome::NoDelivery
    );

    // The log, newest first, paged by attempt number.
    let log = store.list_attempts(&e.id, None, 10).await.unwrap();
    assert_eq!(
        log.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![4, 3, 2, 1]
    );
    assert_eq!(log[1].status_code, Some(204));
    assert_eq!(log[1].trigger, AttemptTrigger::Manual);
    assert_eq!(
        log[3],
        AttemptLog {
            attempt: 1,
            ..failed_log(e, AttemptTrigger::Schedule, T0 + 10)
        }
    );
    assert_eq!(
        store
            .list_attempts(&e.id, Some(3), 1)
            .await
            .unwrap()
            .iter()
            .map(|a| a.attempt)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert!(store
        .list_attempts(&events[1].id, None, 10)
        .await
        .unwrap()
        .is_empty());

    // Giving up raises its alert in the same transaction.
    let e2 = &events[1];
    let give_up = RecordAttempt {
        expected_version: 1,
        log: failed_log(e2, AttemptTrigger::Schedule, T0 + 60),
        state: DeliveryState {
            status: DeliveryStatus::Failed,
            auto_attempts: 11,
            next_attempt_at_ms: None,
            manual_due_at_ms: None,
        },
        job_run_at_ms: None,
        alert: Some(AlertRecord {
            kind: "webhook_delivery_failed".into(),
            subject_id: e2.id.clone(),
            detail: "gave up".into(),
            created_at_ms: T0 + 60,
        }),
        now_ms: T0 + 60,
    };
    assert!(store.record_attempt(&give_up).await.unwrap().applied);
    assert_eq!(
        store.get_delivery(&e2.id).await.unwrap().unwrap().status,
        DeliveryStatus::Failed
    );
    let alerts = store.list_alerts(10).await.unwrap();
    assert_eq!(alerts[0].kind, "webhook_delivery_failed");
    assert_eq!(alerts[0].subject_id, e2.id);
    assert_eq!(store.count_jobs(WEBHOOK).await.unwrap(), 0);
    assert_eq!(store.count_pending_deliveries().await.unwrap(), 0);
}

/// Regression: PostgreSQL numbered the events of one numbering pass in whatever order the
/// UPDATE happened to visit them (heap order), so a merchant's events could be read (and
/// streamed) out of the order they were created in. Both backends number in the order events
/// were written — here against their creation times, as with clocks of several processes that
/// disagree.
pub(crate) async fn check_outbox_numbering_order(store: DynStore) {
    let m = merchant_at(T0).id;
    let mut committed = Vec::new();
    for i in 0..40 {
        let new = new_payment_at(m, &format!("ord-{i}"), T0 + i);
        create(&store, &new).await;
        let t = succeed(&new.payment, &new.attempt, T0 + 10_000 - i);
        committed.push(t.event.as_ref().unwrap().id.clone());
        assert!(store.apply_transition(&t).await.unwrap());
    }
    // One read numbers all of them in one pass.
    let read: Vec<String> = store
        .list_events(m, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(read, committed);
}
