//! Names for where model code is (`transformer.double_blocks.3`), so `--debug-nans` can say which
//! component's op first produced a non-finite value. Free when no one listens: a name is only
//! built while naming is switched on (by the checking backend, `nan_check`).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

static NAMING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static STACK: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Switch naming on or off for the whole process.
pub fn set_naming(on: bool) {
    NAMING.store(on, Ordering::Relaxed);
}

/// Leaves the scope when dropped.
#[must_use = "the scope ends when the guard is dropped"]
pub struct Guard {
    pushed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.pushed {
            STACK.with(|s| s.borrow_mut().pop());
        }
    }
}

/// Enter a named scope on this thread; `name` is only called while naming is on.
pub fn enter(name: impl FnOnce() -> String) -> Guard {
    if !NAMING.load(Ordering::Relaxed) {
        return Guard { pushed: false };
    }
    let name = name();
    STACK.with(|s| s.borrow_mut().push(name));
    Guard { pushed: true }
}

/// The current scopes joined with '/' (empty outside any scope or with naming off).
pub fn current() -> String {
    STACK.with(|s| s.borrow().join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_unwind() {
        set_naming(true);
        {
            let _a = enter(|| "transformer".into());
            let _b = enter(|| "double_blocks.3".into());
            assert_eq!(current(), "transformer/double_blocks.3");
        }
        assert_eq!(current(), "");
    }
}
