fn main() {
    std::process::exit(mtrace_collector::cli::main());
}
