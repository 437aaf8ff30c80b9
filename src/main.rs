use clap::Parser;

fn main() {
    let _cli = infinitetalk_batch::cli::Cli::parse();
}
