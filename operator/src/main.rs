fn main() -> std::process::ExitCode {
    pgwarden_operator::main()
}
