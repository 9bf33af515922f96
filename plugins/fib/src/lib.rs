//! `fib`: the RPC server of RabbitMQ's tutorial 6.
//!
//! The request body is a non-negative integer `n` as text (surrounding whitespace
//! ignored); the reply body is fib(n) in decimal (fib(0) = 0, fib(1) = 1), and
//! `fib(n)` is logged at debug level, like the tutorial's server prints it. Input that
//! is not UTF-8, not an integer, negative, or above 186 (fib(187) overflows u128) is
//! dead-lettered with the reason. Requests without `reply_to` are answered all the
//! same; warren dead-letters such replies. No config keys.

use std::num::IntErrorKind;
use warren_plugin_sdk::{Handler, Message, Outcome, log};

/// The largest n whose Fibonacci number fits in a u128.
const MAX_N: u32 = 186;

struct Fib;

impl Handler for Fib {
    fn handle(msg: Message) -> Outcome {
        match msg.body_str() {
            Ok(text) => match parse(text) {
                Ok(n) => {
                    log::debug(&format!("fib({n})"));
                    Outcome::reply(fib(n).to_string())
                }
                Err(reason) => Outcome::dead_letter(reason),
            },
            Err(e) => Outcome::dead_letter(format!("body is not UTF-8 text: {e}")),
        }
    }
}

warren_plugin_sdk::export!(Fib);

fn parse(text: &str) -> Result<u32, String> {
    let text = text.trim();
    match text.parse::<i128>() {
        Ok(n) if n < 0 => Err(format!("negative: {text}")),
        Ok(n) if n > i128::from(MAX_N) => Err(too_large(text)),
        Ok(n) => Ok(n as u32),
        Err(e) => match e.kind() {
            IntErrorKind::PosOverflow => Err(too_large(text)),
            IntErrorKind::NegOverflow => Err(format!("negative: {text}")),
            _ => Err(format!("not an integer: {text:?}")),
        },
    }
}

fn too_large(text: &str) -> String {
    format!("too large: fib({text}) does not fit in 128 bits (max n is {MAX_N})")
}

fn fib(n: u32) -> u128 {
    let (mut a, mut b) = (0u128, 1u128);
    for _ in 0..n {
        // b runs one step ahead and overflows on the last step for n = MAX_N; only a
        // is returned.
        (a, b) = (b, a.wrapping_add(b));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(fib(0), 0);
        assert_eq!(fib(1), 1);
        assert_eq!(fib(10), 55);
        assert_eq!(fib(30), 832_040);
        assert_eq!(
            fib(MAX_N),
            332_825_110_087_067_562_321_196_029_789_634_457_848
        );
    }

    #[test]
    fn input() {
        assert_eq!(parse(" 30\n"), Ok(30));
        assert_eq!(parse("abc"), Err(r#"not an integer: "abc""#.into()));
        assert_eq!(parse(""), Err(r#"not an integer: """#.into()));
        assert_eq!(parse("-1"), Err("negative: -1".into()));
        assert!(parse("187").unwrap_err().starts_with("too large"));
        assert!(
            parse("1".repeat(60).as_str())
                .unwrap_err()
                .starts_with("too large")
        );
        assert!(
            parse(&format!("-{}", "1".repeat(60)))
                .unwrap_err()
                .starts_with("negative")
        );
    }
}
