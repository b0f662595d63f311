//! Progress bars per stage on a terminal; silent when stderr is piped (indicatif hides itself).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One stage: a bar of `total` ticks with a label, timed.
pub struct Stage {
    bar: ProgressBar,
    start: Instant,
}

impl Stage {
    pub fn new(label: &str, total: u64) -> Stage {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Stage { bar, start: Instant::now() }
    }

    /// A stage of unknown length (loading a component, encoding a prompt): a spinner with the
    /// elapsed time, redrawn on its own so a long stage is never silent on a terminal.
    pub fn spinner(label: &str) -> Stage {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} {spinner} {elapsed_precise} {msg}").expect("valid template"),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Stage { bar, start: Instant::now() }
    }

    pub fn tick(&self) {
        self.bar.inc(1);
    }

    pub fn message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    /// Finish the bar and return the stage's wall time.
    pub fn finish(self) -> Duration {
        self.bar.finish_and_clear();
        self.start.elapsed()
    }
}
