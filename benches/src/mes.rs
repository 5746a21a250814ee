//! A factory simulation: machine signals and operator-linked MES events.
//!
//! - `machine,plant=..,line=..,machine=..` every interval: temperature, spindle_speed,
//!   vibration, power (floats), part_count (unsigned, monotonically increasing),
//!   quality_ok (boolean).
//! - `mes_event,plant=..,line=..,machine=..,event=..` at random (Poisson) times:
//!   login, job_start, job_end, alarm, alarm_ack, quality_check, with operator_id,
//!   operator_name, badge_id, job_id (while a job is active), alarm_code (alarm only),
//!   supervisor_id and result (quality_check only).
//!
//! Each machine follows a realistic sequence: the shift's operator logs in, starts a job,
//! the job runs (quality checks countersigned by the shift supervisor, alarms acknowledged
//! after a while, sometimes by another operator of the shift) and ends, the next job
//! starts after a pause. Three 8-hour shifts (06:00, 14:00, 22:00 UTC) with a fixed pool of
//! 40 operators. Output is time-ordered: the readings at `t`, then the events in
//! `[t, t + interval)` sorted by time.

use crate::lp::{LineWriter, series_key};
use crate::rng::{Rng, round_to};
use crate::time::NS_PER_SEC;

pub const PLANT: &str = "plant_1";
pub const EVENTS: [&str; 6] = [
    "login",
    "job_start",
    "job_end",
    "alarm",
    "alarm_ack",
    "quality_check",
];

/// Operator names: many non-ASCII, apostrophes, and one with a comma and double quotes
/// (to exercise string escaping).
pub const OPERATOR_NAMES: [&str; 40] = [
    "Jürgen Müller",
    "Zoë O'Brien",
    "Anna Schmidt",
    "Mehmet Yılmaz",
    "Łukasz Wiśniewski",
    "Robert \"Bobby\" Tables, Jr.",
    "José Martínez",
    "Björn Andersson",
    "Ewa Kowalczyk",
    "Søren Nielsen",
    "Chloé Dubois",
    "Maria Rossi",
    "Thomas Becker",
    "Fatma Demir",
    "Jan Novák",
    "Inês Gonçalves",
    "Dmitri Ivanov",
    "Sabine Weiß",
    "Kevin O'Connor",
    "Aisha Rahman",
    "Hans-Peter Schäfer",
    "Lucía Fernández",
    "Piotr Zieliński",
    "Emma Johansson",
    "Nguyễn Văn An",
    "Katarzyna Nowak",
    "Stefan Hoffmann",
    "Giulia Bianchi",
    "Ahmed Hassan",
    "Ólafur Jónsson",
    "Claire Martin",
    "Markus Wagner",
    "Yuki Tanaka",
    "Elif Şahin",
    "Pedro Alves",
    "Agnieszka Wójcik",
    "Lars Eriksen",
    "Nadia Benali",
    "Miguel Ángel Ruiz",
    "Sophie Lefèvre",
];

/// Alarm codes a CNC machine might raise.
pub const ALARM_CODES: [i64; 8] = [1001, 1204, 2002, 2210, 3107, 4010, 4420, 5001];

const MIN: f64 = 60.0;

#[derive(Debug, Clone)]
pub struct MesConfig {
    pub seed: u64,
    /// Production lines.
    pub lines: usize,
    /// Machines per line.
    pub machines: usize,
    pub start_ns: i64,
    pub interval_ns: i64,
    /// Multiplies the event rate (1.0: ~10 events per machine per hour).
    pub event_rate: f64,
}

#[derive(Debug, Clone)]
pub struct Operator {
    pub id: String,
    pub name: &'static str,
    pub badge: String,
    pub shift: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Idle,
    Running,
    Alarm,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ev {
    Login = 0,
    JobStart = 1,
    JobEnd = 2,
    Alarm = 3,
    AlarmAck = 4,
    QualityCheck = 5,
    Shift = 6, // internal: operator change, emits nothing by itself
}

struct Job {
    id: String,
    rpm: f64,
    cycle_s: f64,
}

struct Machine {
    key: Vec<u8>,
    event_keys: Vec<Vec<u8>>,
    rng: Rng,
    slot: usize,
    operator: usize,
    pending_operator: usize,
    state: State,
    job: Option<Job>,
    job_remaining: i64,
    progress: f64,
    part_count: u64,
    temperature: f64,
    temp_offset: f64,
    alarm_fresh: bool,
    t_shift: i64,
    t_login: Option<i64>,
    t_job_start: Option<i64>,
    t_job_end: Option<i64>,
    t_alarm: Option<i64>,
    t_ack: Option<i64>,
    t_qc: Option<i64>,
}

struct Ctx {
    operators: Vec<Operator>,
    supervisors: Vec<String>,
    shift_ops: [Vec<usize>; 3],
    /// Multiplier for all event intervals (1 / event_rate).
    scale: f64,
    job_seq: u64,
}

/// Shift index (0: 06-14, 1: 14-22, 2: 22-06 UTC) at `ns`.
pub fn shift_of(ns: i64) -> usize {
    let h = ns.rem_euclid(86400 * NS_PER_SEC) / (3600 * NS_PER_SEC);
    match h {
        6..=13 => 0,
        14..=21 => 1,
        _ => 2,
    }
}

/// The first shift change strictly after `ns`.
pub fn next_shift_change(ns: i64) -> i64 {
    let day = 86400 * NS_PER_SEC;
    let day_start = ns - ns.rem_euclid(day);
    [6, 14, 22, 30]
        .iter()
        .map(|h| day_start + h * 3600 * NS_PER_SEC)
        .find(|&t| t > ns)
        .expect("a boundary within 30h")
}

/// Round a time offset in seconds to whole milliseconds, in ns (events carry ms times).
fn ms(secs: f64) -> i64 {
    (secs * 1000.0).round().max(1.0) as i64 * 1_000_000
}

impl Ctx {
    fn operator_for(&self, shift: usize, slot: usize) -> usize {
        let ops = &self.shift_ops[shift];
        ops[slot % ops.len()]
    }
}

impl Machine {
    fn next_timer(&self) -> (i64, Ev) {
        let mut best = (self.t_shift, Ev::Shift);
        for (t, ev) in [
            (self.t_login, Ev::Login),
            (self.t_ack, Ev::AlarmAck),
            (self.t_job_end, Ev::JobEnd),
            (self.t_alarm, Ev::Alarm),
            (self.t_qc, Ev::QualityCheck),
            (self.t_job_start, Ev::JobStart),
        ] {
            if let Some(t) = t
                && t < best.0
            {
                best = (t, ev);
            }
        }
        best
    }

    /// Process this machine's events before `until`, appending (ts, seq, line) to `events`.
    fn run_events(&mut self, ctx: &mut Ctx, until: i64, events: &mut Vec<(i64, u32, Vec<u8>)>) {
        let s = ctx.scale;
        let mut seq = 0u32;
        loop {
            let (now, ev) = self.next_timer();
            if now >= until {
                return;
            }
            match ev {
                Ev::Shift => {
                    self.pending_operator = ctx.operator_for(shift_of(now), self.slot);
                    self.t_login = Some(now + ms(self.rng.range(0.0, 8.0 * MIN)));
                    self.t_shift = next_shift_change(now);
                    continue;
                }
                Ev::Login => {
                    self.t_login = None;
                    self.operator = self.pending_operator;
                    let line = self.finish(ctx, ev, now, self.operator, |_| {});
                    events.push((now, seq, line));
                    if self.state == State::Idle && self.t_job_start.is_none() {
                        self.t_job_start = Some(now + ms(self.rng.range(1.0, 5.0) * MIN * s));
                    }
                }
                Ev::JobStart => {
                    self.t_job_start = None;
                    ctx.job_seq += 1;
                    self.job = Some(Job {
                        id: format!("JOB-{:06}", ctx.job_seq),
                        rpm: 100.0 * self.rng.between(60, 140) as f64,
                        cycle_s: self.rng.range(20.0, 90.0),
                    });
                    self.progress = 0.0;
                    self.state = State::Running;
                    self.t_job_end = Some(now + ms(self.rng.range(10.0, 50.0) * MIN * s));
                    self.t_alarm = Some(now + ms(self.rng.exp(90.0 * MIN * s)));
                    self.t_qc = Some(now + ms(self.rng.exp(25.0 * MIN * s)));
                    let line = self.finish(ctx, ev, now, self.operator, |_| {});
                    events.push((now, seq, line));
                }
                Ev::JobEnd => {
                    let line = self.finish(ctx, ev, now, self.operator, |_| {});
                    events.push((now, seq, line));
                    self.job = None;
                    self.state = State::Idle;
                    self.t_job_end = None;
                    self.t_alarm = None;
                    self.t_qc = None;
                    self.t_job_start = Some(now + ms(self.rng.range(1.0, 6.0) * MIN * s));
                }
                Ev::Alarm => {
                    let code = *self.rng.pick(&ALARM_CODES);
                    let line = self.finish(ctx, ev, now, self.operator, |w| {
                        w.i64("alarm_code", code);
                    });
                    events.push((now, seq, line));
                    self.state = State::Alarm;
                    self.alarm_fresh = true;
                    self.job_remaining = self.t_job_end.map_or(0, |t| t - now);
                    self.t_job_end = None;
                    self.t_alarm = None;
                    self.t_qc = None;
                    self.t_ack = Some(now + ms(self.rng.range(20.0, 6.0 * MIN)));
                }
                Ev::AlarmAck => {
                    // Usually the machine's operator; sometimes a colleague of the shift.
                    let mut by = self.operator;
                    if self.rng.chance(0.35) {
                        let ops = &ctx.shift_ops[shift_of(now)];
                        let other = ops[self.rng.below(ops.len() as u64) as usize];
                        if other != self.operator {
                            by = other;
                        }
                    }
                    let line = self.finish(ctx, ev, now, by, |_| {});
                    events.push((now, seq, line));
                    self.state = State::Running;
                    self.t_ack = None;
                    self.t_job_end = Some(now + self.job_remaining.max(1_000_000));
                    self.t_alarm = Some(now + ms(self.rng.exp(90.0 * MIN * s)));
                    self.t_qc = Some(now + ms(self.rng.exp(25.0 * MIN * s)));
                }
                Ev::QualityCheck => {
                    let shift = shift_of(now);
                    let sup = ctx.supervisors[2 * shift + self.rng.below(2) as usize].clone();
                    let p_fail = if self.temperature > 85.0 { 0.3 } else { 0.06 };
                    let result = if self.rng.chance(p_fail) {
                        "fail"
                    } else {
                        "pass"
                    };
                    let line = self.finish(ctx, ev, now, self.operator, |w| {
                        w.str("supervisor_id", &sup).str("result", result);
                    });
                    events.push((now, seq, line));
                    self.t_qc = Some(now + ms(self.rng.exp(25.0 * MIN * s)));
                }
            }
            seq += 1;
        }
    }

    fn finish(
        &self,
        ctx: &Ctx,
        ev: Ev,
        ts: i64,
        operator: usize,
        extra: impl FnOnce(&mut LineWriter),
    ) -> Vec<u8> {
        let mut line = Vec::with_capacity(220);
        let mut w = LineWriter::with_series(&mut line, &self.event_keys[ev as usize]);
        let op = &ctx.operators[operator];
        w.str("operator_id", &op.id)
            .str("operator_name", op.name)
            .str("badge_id", &op.badge);
        if let Some(job) = &self.job {
            w.str("job_id", &job.id);
        }
        extra(&mut w);
        w.end(ts);
        line
    }

    fn write_reading(&mut self, out: &mut Vec<u8>, ts: i64, interval_s: f64) {
        let r = &mut self.rng;
        let (target, spindle, vibration, power, quality_ok);
        match self.state {
            State::Running => {
                let job = self.job.as_ref().expect("running without a job");
                target = 70.0 + self.temp_offset;
                spindle = job.rpm * (1.0 + 0.004 * r.normal());
                vibration = (1.2 + job.rpm / 7000.0 + 0.3 * r.normal()).max(0.05);
                power = 3.0 + job.rpm / 1000.0 * 1.1 + 0.3 * r.normal();
                self.progress += interval_s / job.cycle_s;
                while self.progress >= 1.0 {
                    self.part_count += 1;
                    self.progress -= 1.0;
                }
                let p_bad = if self.temperature > 85.0 { 0.15 } else { 0.02 };
                quality_ok = !r.chance(p_bad);
            }
            State::Alarm => {
                target = 55.0 + self.temp_offset / 2.0;
                spindle = 0.0;
                vibration = if self.alarm_fresh {
                    r.range(6.0, 12.0)
                } else {
                    r.range(0.05, 0.2)
                };
                self.alarm_fresh = false;
                power = r.range(0.7, 1.0);
                quality_ok = true;
            }
            State::Idle => {
                target = 42.0 + self.temp_offset / 2.0;
                spindle = 0.0;
                vibration = r.range(0.05, 0.2);
                power = r.range(0.9, 1.3);
                quality_ok = true;
            }
        }
        let k = (0.02 * interval_s).min(1.0);
        self.temperature += (target - self.temperature) * k + 0.2 * r.normal();
        self.temperature = self.temperature.clamp(40.0, 90.0);
        let mut w = LineWriter::with_series(out, &self.key);
        w.f64("temperature", round_to(self.temperature, Some(2)))
            .f64("spindle_speed", round_to(spindle, Some(1)))
            .f64("vibration", round_to(vibration, Some(3)))
            .f64("power", round_to(power, Some(2)))
            .u64("part_count", self.part_count)
            .bool("quality_ok", quality_ok);
        w.end(ts);
    }
}

/// Streams the factory's line protocol tick by tick.
pub struct MesGen {
    ctx: Ctx,
    machines: Vec<Machine>,
    next_ts: i64,
    interval_ns: i64,
    events: Vec<(i64, usize, u32, Vec<u8>)>,
    scratch: Vec<(i64, u32, Vec<u8>)>,
}

impl MesGen {
    pub fn new(cfg: &MesConfig) -> Self {
        assert!(cfg.lines > 0 && cfg.machines > 0 && cfg.interval_ns > 0);
        assert!(cfg.event_rate > 0.0, "event rate must be positive");
        let mut rng = Rng::stream(cfg.seed, u64::MAX);
        let mut used = std::collections::BTreeSet::new();
        let mut operators = Vec::new();
        for (k, name) in OPERATOR_NAMES.iter().enumerate() {
            let num = loop {
                let n = rng.between(10000, 99999);
                if used.insert(n) {
                    break n;
                }
            };
            operators.push(Operator {
                id: format!("OP-{num}"),
                name,
                badge: format!("BDG-{:08X}", rng.next_u64() as u32),
                shift: k % 3,
            });
        }
        let supervisors = (0..6)
            .map(|_| format!("SUP-{}", rng.between(1000, 9999)))
            .collect();
        let shift_ops = [0, 1, 2].map(|s| {
            operators
                .iter()
                .enumerate()
                .filter(|(_, o)| o.shift == s)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        });
        let job_seq = rng.between(1000, 9000);
        let ctx = Ctx {
            operators,
            supervisors,
            shift_ops,
            scale: 1.0 / cfg.event_rate,
            job_seq,
        };
        let mut machines = Vec::new();
        for l in 1..=cfg.lines {
            for m in 1..=cfg.machines {
                let slot = machines.len();
                let mut rng = Rng::stream(cfg.seed, slot as u64);
                let line = format!("line_{l}");
                let machine = format!("m_{l}_{m}");
                let key = series_key(
                    "machine",
                    &[("plant", PLANT), ("line", &line), ("machine", &machine)],
                );
                let event_keys = EVENTS
                    .iter()
                    .map(|e| {
                        series_key(
                            "mes_event",
                            &[
                                ("plant", PLANT),
                                ("line", &line),
                                ("machine", &machine),
                                ("event", e),
                            ],
                        )
                    })
                    .collect();
                let operator = ctx.operator_for(shift_of(cfg.start_ns), slot);
                machines.push(Machine {
                    key,
                    event_keys,
                    slot,
                    operator,
                    pending_operator: operator,
                    state: State::Idle,
                    job: None,
                    job_remaining: 0,
                    progress: 0.0,
                    part_count: rng.between(0, 500_000),
                    temperature: rng.range(40.0, 50.0),
                    temp_offset: rng.range(-5.0, 10.0),
                    alarm_fresh: false,
                    t_shift: next_shift_change(cfg.start_ns),
                    t_login: Some(cfg.start_ns + ms(rng.range(0.0, 2.0 * MIN))),
                    t_job_start: None,
                    t_job_end: None,
                    t_alarm: None,
                    t_ack: None,
                    t_qc: None,
                    rng,
                });
            }
        }
        MesGen {
            ctx,
            machines,
            next_ts: cfg.start_ns,
            interval_ns: cfg.interval_ns,
            events: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The operator pool (id, name, badge, shift).
    pub fn operators(&self) -> &[Operator] {
        &self.ctx.operators
    }

    /// Timestamp of the next tick.
    pub fn next_ts(&self) -> i64 {
        self.next_ts
    }

    /// Append one tick: every machine's reading at `t`, then all events in
    /// `[t, t + interval)` in time order.
    pub fn write_tick(&mut self, out: &mut Vec<u8>) {
        let t = self.next_ts;
        let until = t + self.interval_ns;
        let interval_s = self.interval_ns as f64 / NS_PER_SEC as f64;
        self.events.clear();
        for (i, m) in self.machines.iter_mut().enumerate() {
            m.write_reading(out, t, interval_s);
            self.scratch.clear();
            m.run_events(&mut self.ctx, until, &mut self.scratch);
            self.events
                .extend(self.scratch.drain(..).map(|(ts, seq, l)| (ts, i, seq, l)));
        }
        self.events.sort_by_key(|(ts, i, seq, _)| (*ts, *i, *seq));
        for (_, _, _, line) in &self.events {
            out.extend_from_slice(line);
        }
        self.next_ts = until;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lp::tests::{Val, parse_line};
    use std::collections::HashMap;

    const START: i64 = 1_767_247_200 * NS_PER_SEC; // 2026-01-01T06:00:00Z

    fn generate(seed: u64, hours: i64, interval_s: i64, rate: f64) -> Vec<u8> {
        let cfg = MesConfig {
            seed,
            lines: 2,
            machines: 3,
            start_ns: START - 3 * 3600 * NS_PER_SEC,
            interval_ns: interval_s * NS_PER_SEC,
            event_rate: rate,
        };
        let mut g = MesGen::new(&cfg);
        let end = cfg.start_ns + hours * 3600 * NS_PER_SEC;
        let mut out = Vec::new();
        while g.next_ts() < end {
            g.write_tick(&mut out);
        }
        out
    }

    #[test]
    fn shifts() {
        assert_eq!(shift_of(START), 0);
        assert_eq!(shift_of(START - 1), 2);
        assert_eq!(shift_of(START + 8 * 3600 * NS_PER_SEC), 1);
        assert_eq!(next_shift_change(START - 1), START);
        assert_eq!(next_shift_change(START), START + 8 * 3600 * NS_PER_SEC);
    }

    #[test]
    fn deterministic() {
        assert_eq!(generate(5, 2, 10, 1.0), generate(5, 2, 10, 1.0));
        assert_ne!(generate(5, 2, 10, 1.0), generate(6, 2, 10, 1.0));
    }

    #[test]
    fn realistic_sequences() {
        let out = String::from_utf8(generate(11, 24, 10, 3.0)).unwrap();
        let mut last_ts = i64::MIN;
        let mut readings = 0;
        let mut counts: HashMap<String, usize> = HashMap::new();
        // per machine: running job id, alarm open, last part_count
        let mut job: HashMap<String, Option<String>> = HashMap::new();
        let mut alarm_open: HashMap<String, bool> = HashMap::new();
        let mut parts: HashMap<String, u64> = HashMap::new();
        let mut acks_by_other = 0;
        let mut alarm_by: HashMap<String, String> = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for l in out.lines() {
            let (m, tags, fields, ts) = parse_line(l);
            assert!(ts >= last_ts, "time order");
            last_ts = ts;
            let tag = |k: &str| tags.iter().find(|(tk, _)| tk == k).map(|(_, v)| v.clone());
            let field = |k: &str| {
                fields
                    .iter()
                    .find(|(fk, _)| fk == k)
                    .map(|(_, v)| v.clone())
            };
            let machine = tag("machine").unwrap();
            assert_eq!(tag("plant").unwrap(), PLANT);
            if m == "machine" {
                readings += 1;
                assert_eq!(ts % (10 * NS_PER_SEC), 0);
                let Some(Val::U(pc)) = field("part_count") else {
                    panic!("part_count")
                };
                let prev = parts.insert(machine.clone(), pc);
                assert!(prev.is_none_or(|p| p <= pc), "monotonic part_count");
                let Some(Val::F(t)) = field("temperature") else {
                    panic!()
                };
                assert!((40.0..=90.0).contains(&t));
                assert!(matches!(field("quality_ok"), Some(Val::B(_))));
                continue;
            }
            assert_eq!(m, "mes_event");
            assert_eq!(ts % 1_000_000, 0, "events at ms resolution");
            let ev = tag("event").unwrap();
            *counts.entry(ev.clone()).or_default() += 1;
            let Some(Val::S(op)) = field("operator_id") else {
                panic!("operator_id")
            };
            assert!(op.starts_with("OP-") && op.len() == 8, "{op}");
            let Some(Val::S(name)) = field("operator_name") else {
                panic!()
            };
            names.insert(name);
            assert!(matches!(field("badge_id"), Some(Val::S(_))));
            assert_eq!(field("alarm_code").is_some(), ev == "alarm");
            assert_eq!(field("supervisor_id").is_some(), ev == "quality_check");
            assert_eq!(field("result").is_some(), ev == "quality_check");
            let cur = job.entry(machine.clone()).or_default();
            let open = alarm_open.entry(machine.clone()).or_default();
            let job_id = match field("job_id") {
                Some(Val::S(j)) => Some(j),
                None => None,
                _ => panic!(),
            };
            match ev.as_str() {
                "job_start" => {
                    assert!(cur.is_none(), "job_start while running");
                    *cur = job_id;
                }
                "job_end" => {
                    assert!(!*open);
                    assert_eq!(*cur, job_id);
                    *cur = None;
                }
                "alarm" => {
                    assert!(cur.is_some() && !*open);
                    *open = true;
                    alarm_by.insert(machine.clone(), op.clone());
                }
                "alarm_ack" => {
                    assert!(*open);
                    *open = false;
                    if alarm_by[&machine] != op {
                        acks_by_other += 1;
                    }
                }
                "quality_check" => {
                    assert!(cur.is_some() && !*open);
                    let Some(Val::S(r)) = field("result") else {
                        panic!()
                    };
                    assert!(r == "pass" || r == "fail");
                }
                "login" => assert_eq!(*cur, job_id),
                other => panic!("unknown event {other}"),
            }
        }
        assert_eq!(readings, 6 * 24 * 360);
        for e in EVENTS {
            assert!(
                counts.get(e).copied().unwrap_or(0) > 0,
                "no {e} in {counts:?}"
            );
        }
        assert!(acks_by_other > 0);
        assert!(names.len() > 10);
        // 3 shift changes a day plus the start: 4 logins per machine.
        assert_eq!(counts["login"], 6 * 4);
    }

    #[test]
    fn escaping_of_names_is_parseable() {
        let g = MesGen::new(&MesConfig {
            seed: 1,
            lines: 1,
            machines: 1,
            start_ns: START,
            interval_ns: NS_PER_SEC,
            event_rate: 1.0,
        });
        assert_eq!(g.operators().len(), 40);
        let ids: std::collections::HashSet<_> = g.operators().iter().map(|o| &o.id).collect();
        assert_eq!(ids.len(), 40);
        let mut buf = Vec::new();
        let mut w = LineWriter::new(&mut buf, "mes_event");
        w.str("operator_name", OPERATOR_NAMES[5]);
        w.end(1);
        let (_, _, f, _) = parse_line(std::str::from_utf8(&buf).unwrap());
        assert_eq!(f[0].1, Val::S("Robert \"Bobby\" Tables, Jr.".into()));
        assert!(
            std::str::from_utf8(&buf)
                .unwrap()
                .contains(r#""Robert \"Bobby\" Tables, Jr.""#)
        );
    }
}
