//! The person's terminal for `drover exec -it`: its size, and raw mode while a session runs.

use drover_model::logs::WinSize;

/// The terminal's size (of stdin, else stdout), if either is a terminal.
pub fn size() -> Option<WinSize> {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: TIOCGWINSZ writes a winsize to the pointer, which is valid for the call.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some(WinSize {
                cols: ws.ws_col,
                rows: ws.ws_row,
            });
        }
    }
    None
}

/// Stdin in raw mode (keys go through as typed, Ctrl-C included) until dropped.
pub struct Raw(libc::termios);

impl Raw {
    pub fn enter() -> Option<Raw> {
        // SAFETY: tcgetattr/tcsetattr read and write a termios through valid pointers.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(Raw(saved))
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: as above; the saved settings are restored.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}
