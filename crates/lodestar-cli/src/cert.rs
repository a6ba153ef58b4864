//! `lodestar cert`: a development CA and certificates, so TLS is one command away.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use lodestar::tls::DevPki;

/// Options of `lodestar cert`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory to write ca.pem, ca.key, server.pem, server.key, client.pem and client.key into.
    #[arg(long, default_value = "certs")]
    out: PathBuf,
    /// A name or IP address the server certificate is valid for (repeatable).
    #[arg(long = "host", default_values = ["localhost", "127.0.0.1", "::1"])]
    hosts: Vec<String>,
    /// How many years the certificates are valid.
    #[arg(long, default_value_t = 2)]
    years: u32,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    if !args.force && args.out.join("ca.pem").exists() {
        return Err(format!(
            "{} already holds certificates; pass --force to replace them",
            args.out.display()
        )
        .into());
    }
    let hosts: Vec<&str> = args.hosts.iter().map(String::as_str).collect();
    let pki = DevPki::generate(&hosts, args.years)?;
    pki.write_to(&args.out)?;
    let dir = args.out.display();
    println!(
        "Wrote a development CA and certificates to {dir}/ (valid {} years):",
        args.years
    );
    for (name, _) in pki.files() {
        println!("  {dir}/{name}");
    }
    println!(
        "The server certificate is valid for: {}",
        args.hosts.join(", ")
    );
    println!(
        "\nServer:  .tls(ServerTls::from_pem_files(\"{dir}/server.pem\", \"{dir}/server.key\")?)\n\
         Client:  .tls(ClientTls::from_ca_file(\"{dir}/ca.pem\")?)\n\
         Mutual TLS: add .require_client_certs_from_file(\"{dir}/ca.pem\")? on the server and\n\
         \x20           .with_identity_files(\"{dir}/client.pem\", \"{dir}/client.key\")? on the client.\n\
         These keys are for development only."
    );
    Ok(ExitCode::SUCCESS)
}
