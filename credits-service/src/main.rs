//! `dialtone-credits` binary: see `dialtone_credits::cli::USAGE`.

fn main() {
    std::process::exit(dialtone_credits::cli::main_exit());
}
