//! Helpers the benches and `examples/nginx_compare.rs` share: pinning a thread to a core,
//! raising the limit on open files, and the canned SSE token events an upstream serves.
//!
//! Each user includes this file with `#[path]` and uses only some of it.

#![allow(dead_code)]

use bytes::Bytes;

/// The `i`th token event: an OpenAI `chat.completion.chunk`, 157 bytes.
pub(crate) fn sse_event(i: usize) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"llama-3.1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i:05}\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

pub(crate) fn leak(data: Vec<u8>) -> Bytes {
    Bytes::from_static(Box::leak(data.into_boxed_slice()))
}

/// Pins the calling thread (and the threads it starts from now on) to `core`.
#[allow(unsafe_code)]
pub(crate) fn pin_to(core: usize) {
    // SAFETY: `set` is a zeroed, then filled, `cpu_set_t` that outlives the call.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(pinned, 0, "could not pin a thread to core {core}");
}

/// Raises the soft limit on open files to the hard limit (children inherit it); returns the
/// soft limit.
#[allow(unsafe_code)]
pub(crate) fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    let wanted = limit.rlim_max.min(1 << 20);
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid `rlimit`; the call only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return wanted;
        }
    }
    limit.rlim_cur
}
