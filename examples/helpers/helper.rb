#!/usr/bin/env ruby
# frozen_string_literal: true

# Example Muster / Choria provisioning helper in Ruby (stdlib only).
#
# Reads the request JSON on stdin and writes the reply JSON on stdout:
#   - defers the node when its fact "defer" is "true";
#   - picks plugin.choria.middleware_hosts by the "country" fact
#     (mt -> choria1.mt.example.net:4223, otherwise $MUSTER_BROKER,
#     default localhost:4222);
#   - signs the node's CSR with the CA in $MUSTER_CA_DIR and returns the
#     certificate, the CA and the ssldir. It signs with "muster-helper sign"
#     ($MUSTER_HELPER_BIN, else muster-helper on the PATH), which starts in
#     a few milliseconds, else with "${MUSTER_BIN:-muster} ca sign".
# Diagnostics go to stderr (Muster keeps a bounded copy); exit 1 on error.
# With --persistent it is a persistent helper (docs/helpers.md): request
# lines in, reply lines tagged with request_id out.

require 'json'
require 'open3'

class HelperError < StandardError; end

# The command that signs a CSR on stdin with the CA in ca_dir.
def signer(ca_dir)
  fast = ENV.fetch('MUSTER_HELPER_BIN', '')
  if fast.empty?
    fast = ENV.fetch('PATH', '').split(File::PATH_SEPARATOR).map { |d| File.join(d, 'muster-helper') }
              .find { |f| File.file?(f) && File.executable?(f) } || ''
  end
  return [fast, 'sign', '--ca-dir', ca_dir] unless fast.empty?

  muster = ENV.fetch('MUSTER_BIN', '').empty? ? 'muster' : ENV['MUSTER_BIN']
  [muster, 'ca', 'sign', '--dir', ca_dir, '--csr', '-']
end

def fail_with(msg)
  raise HelperError, msg
end

def answer(request)
  identity = request['identity'] || fail_with('request has no identity')
  # The inventory is a JSON *string* holding an object.
  inventory_text = request['inventory'].to_s
  inventory = inventory_text.empty? ? {} : JSON.parse(inventory_text)
  facts = inventory['facts'] || {}

  if facts['defer'] == 'true'
    return { 'defer' => true, 'msg' => "node #{identity} asked to be deferred" }
  end

  brokers = if facts['country'] == 'mt'
              'choria1.mt.example.net:4223'
            else
              ENV.fetch('MUSTER_BROKER', '').empty? ? 'localhost:4222' : ENV['MUSTER_BROKER']
            end

  csr = request['csr']
  ssldir = (csr && csr['ssldir']) || '/etc/muster/ssl'
  reply = {
    'defer' => false,
    'msg' => "configured #{identity}",
    'configuration' => {
      'identity' => identity,
      'plugin.choria.middleware_hosts' => brokers,
      'plugin.security.provider' => 'file',
      'plugin.security.file.certificate' => "#{ssldir}/certificate.pem",
      'plugin.security.file.key' => "#{ssldir}/private.pem",
      'plugin.security.file.ca' => "#{ssldir}/ca.pem",
      'plugin.choria.server.provision' => 'false'
    }
  }

  if csr
    ca_dir = ENV.fetch('MUSTER_CA_DIR', '')
    fail_with('MUSTER_CA_DIR must name the CA directory') if ca_dir.empty?
    cert, err, status = Open3.capture3(*signer(ca_dir), stdin_data: csr['csr'])
    fail_with("signing the CSR of #{identity} failed: #{err.strip}") unless status.success?
    reply['certificate'] = cert
    reply['ca'] = File.read(File.join(ca_dir, 'ca.pem'))
    reply['ssldir'] = ssldir
  end
  reply
end

if ARGV.include?('--persistent')
  # Persistent mode: one request per line, one reply line each, tagged with
  # its request_id; a failed request gets an "error" reply.
  $stdout.sync = true
  $stdin.each_line do |line|
    next if line.strip.empty?
    request = JSON.parse(line)
    reply = begin
      answer(request)
    rescue StandardError => e
      { 'error' => e.message }
    end
    reply['request_id'] = request['request_id']
    puts JSON.generate(reply)
  end
else
  begin
    puts JSON.generate(answer(JSON.parse($stdin.read)))
  rescue HelperError => e
    warn "helper.rb: #{e.message}"
    exit 1
  end
end
